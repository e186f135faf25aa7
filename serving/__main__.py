"""`python -m serving --model-uri models:/patchcore-<category>@champion`: the guarded scoring server."""

import sys

from serving.app import main

sys.exit(main())
