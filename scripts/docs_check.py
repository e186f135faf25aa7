#!/usr/bin/env python
"""Run every command of the real set-up in docs/pipeline.md, in order, as a user would (`make docs-check`).

The commands are read from the ```bash blocks of the section "### Real set-up" and run in the repository root
with the virtual environment first on PATH. What a user cannot share with a test machine is changed, nothing
else: the fixed ports (5000, 4200, 8333, 5001) become free loopback ports, `runs/` becomes a temporary folder,
PREFECT_HOME is temporary. A command marked `# terminal N` is a server: it is started in the background
(its own process group and log) and waited for; `export` lines carry into the commands after them; every
other command must exit 0 (and the `curl` must return predictions). At the end every server is stopped and
the worker's log is checked for the promotion decision and for noise a user cannot fix (telemetry errors,
progress bars, pydantic warnings)::

    .venv/bin/python scripts/docs_check.py [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from anywhere: the repo's packages first
from infra.local_servers import free_port, stop_group, wait_http  # noqa: E402

DOC = REPO / "docs" / "pipeline.md"
SECTION = "### Real set-up"
FIXED_PORTS = ("5000", "4200", "8333", "5001")
NOISE = ("Failed to send telemetry", "shadows an attribute", "Downloading artifacts", "Traceback", "UserWarning")


def doc_commands(text: str) -> list[str]:
    """The shell commands of the section's ```bash blocks, continuation lines joined, in order."""
    start = text.index(SECTION)
    end = text.find("\n### ", start + len(SECTION))
    section = text[start:end if end > 0 else None]
    commands: list[str] = []
    for block in re.findall(r"```bash\n(.*?)```", section, flags=re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        commands += [line.strip() for line in joined.splitlines() if line.strip() and not line.strip().startswith("#")]
    return commands


def localise(command: str, ports: dict[str, str], runs: Path) -> str:
    command = command.replace("$PWD/runs/", f"{runs}/")
    command = re.sub(r"(?<![\w/.$-])runs/", f"{runs}/", command)
    return re.sub(r"\b(" + "|".join(FIXED_PORTS) + r")\b", lambda m: ports[m.group(1)], command)


def wait_log(pattern: str, proc: subprocess.Popen, log: Path, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pattern in log.read_text(errors="replace"):
            return
        if proc.poll() is not None:
            raise RuntimeError(f"exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        time.sleep(0.5)
    raise TimeoutError(f"{pattern!r} not in {log} after {timeout}s:\n{log.read_text()[-3000:]}")


def ready(command: str, ports: dict[str, str], proc: subprocess.Popen, log: Path) -> None:
    """Wait until the server a `# terminal` command starts is serving."""
    if command.startswith("mlflow server"):
        wait_http(f"http://127.0.0.1:{ports['5000']}/health", proc, 240, log)
    elif command.startswith("prefect server start"):
        wait_http(f"http://127.0.0.1:{ports['4200']}/api/health", proc, 240, log)
    elif command.startswith("mlflow models serve"):
        wait_http(f"http://127.0.0.1:{ports['5001']}/ping", proc, 240, log)
    elif "infra/s3_server.py" in command:
        wait_log("S3 server ready", proc, log)
    elif command.startswith("prefect worker start"):
        wait_log("started", proc, log)
    else:
        raise ValueError(f"no readiness check for {command!r}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (logs, runs)")
    parser.add_argument("--timeout", type=float, default=1200, help="per foreground command, seconds")
    args = parser.parse_args(argv)

    tmp = Path(tempfile.mkdtemp(prefix="patchcore-docs-check-"))
    runs, logs = tmp / "runs", tmp / "logs"
    logs.mkdir(parents=True)
    ports = {p: str(free_port()) for p in FIXED_PORTS}
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PREFECT_", "MLFLOW_", "AWS_", "PATCHCORE_WORK_DIR"))}
    env.update(PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}", PREFECT_HOME=str(tmp / "home"),
               PYTHONUNBUFFERED="1")
    servers: list[tuple[str, subprocess.Popen, Path]] = []
    timings: list[tuple[float, str]] = []
    failed = None
    try:
        for n, original in enumerate(doc_commands(DOC.read_text())):
            command = localise(original, ports, runs)
            shown = original if len(original) < 110 else original[:107] + "..."
            print(f"$ {shown}", flush=True)
            started = time.monotonic()
            if command.startswith("export "):
                out = subprocess.run(["bash", "-c", f"{command.split('#')[0]}\nenv -0"], env=env, cwd=REPO,
                                     capture_output=True, timeout=60, check=True)
                env = dict(item.split("=", 1) for item in out.stdout.decode().split("\0") if "=" in item)
            elif "# terminal" in command:
                log = logs / (f"{n:02d}-" + re.sub(r"[^\w.-]+", "_", " ".join(original.split()[:3]))[:60] + ".log")
                with open(log, "wb") as out:
                    proc = subprocess.Popen(["bash", "-c", f"exec {command.split('#')[0]}"], env=env, cwd=REPO,
                                            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            start_new_session=True)
                servers.append((command, proc, log))
                ready(command, ports, proc, log)
            else:
                done = subprocess.run(["bash", "-c", command], env=env, cwd=REPO, capture_output=True, text=True,
                                      timeout=args.timeout)
                if done.returncode != 0:
                    raise RuntimeError(f"exit {done.returncode}\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}")
                if command.startswith("curl"):
                    predictions = json.loads(done.stdout)["predictions"]
                    assert predictions and {"score", "is_anomalous"} <= set(predictions[0]), done.stdout
                    print(f"  {done.stdout.strip()}")
            timings.append((time.monotonic() - started, shown))
            print(f"  ok ({timings[-1][0]:.0f} s)", flush=True)
        worker_logs = [log for command, _, log in servers if command.startswith("prefect worker start")]
        for log in worker_logs:
            text = log.read_text(errors="replace")
            assert "promotion of patchcore-" in text, "the worker log does not state the promotion decision"
            noise = [line for line in text.splitlines() if any(n in line for n in NOISE)]
            assert not noise, "noise in the worker log:\n" + "\n".join(noise[:20])
    except BaseException as exc:  # noqa: BLE001 - report, stop the servers, exit 1
        failed = exc
    finally:
        for _, proc, _ in reversed(servers):
            stop_group(proc)
    total = sum(t for t, _ in timings)
    print(f"\n{len(timings)} commands in {total:.0f} s; logs in {logs}")
    if failed is not None:
        print(f"\nFAILED: {type(failed).__name__}: {failed}", file=sys.stderr)
        for command, _, log in servers:
            print(f"\n--- {command[:80]} ({log}) ---\n{log.read_text(errors='replace')[-2500:]}", file=sys.stderr)
        return 1
    if not args.keep:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
