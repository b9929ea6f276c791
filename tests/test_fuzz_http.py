"""schemathesis against the real process: no 5xx, every answer as documented, the process alive.

Bounded and seeded: a fixed seed and a fixed number of examples per operation,
so a run is reproducible and takes well under a minute.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

from http_bridge.openapi import OPENAPI_PATH
from tests.support import ROOT, ServiceProcess, token

SEED = 20261202
EXAMPLES_PER_OPERATION = 100
CHECKS = ",".join([
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_headers_conformance",
    "response_schema_conformance",
])


def test_schemathesis_finds_no_server_error_and_no_undocumented_answer(
    make_service: Callable[..., ServiceProcess], tmp_path: Path
) -> None:
    st = shutil.which("st", path=str(ROOT / ".venv" / "bin")) or shutil.which("st")
    assert st is not None, "schemathesis is missing: run scripts/setup test"
    process = make_service()
    result = subprocess.run(
        [st, "run", process.base_url + OPENAPI_PATH,
         "--header", f"Authorization: Bearer {token('fuzzer', 'org-fuzz')}",
         "--checks", CHECKS, "--seed", str(SEED), "--max-examples", str(EXAMPLES_PER_OPERATION),
         "--phases", "examples,coverage,fuzzing", "--workers", "1", "--no-shrink",
         "--request-timeout", "10"],
        cwd=tmp_path, capture_output=True, text=True, timeout=110, check=False,
    )
    report = result.stdout[-6000:] + result.stderr[-2000:]
    assert result.returncode == 0, report
    assert process.process is not None and process.process.poll() is None, "the service died"
    assert "Traceback" not in process.stderr(), process.stderr()[-4000:]
