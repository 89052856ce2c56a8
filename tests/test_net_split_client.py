"""The hospitals' wire clients load without torch or TenSEAL, so one process can hold hundreds of hospitals."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("module", ["splitfl.net.split.client", "splitfl.net.fed.client", "splitfl.bench.clinic_clients"])
def test_wire_client_imports_no_torch(module: str) -> None:
    code = (f"import sys\nimport {module}\n"
            "heavy = [m for m in ('torch', 'tenseal', 'timm', 'lightning') if m in sys.modules]\n"
            "print('HEAVY', heavy)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "HEAVY []" in proc.stdout, f"{module} imported {proc.stdout.strip()}"


def test_real_hospitals_run_the_wire_clients() -> None:
    """RemoteSplitServer and FedSiteClient are the light clients plus training: one code path on the wire."""
    from splitfl.net.fed.client import FedClient
    from splitfl.net.fed.hospital import FedSiteClient
    from splitfl.net.split.client import SplitClient
    from splitfl.net.split.hospital import RemoteSplitServer

    assert issubclass(RemoteSplitServer, SplitClient) and issubclass(FedSiteClient, FedClient)
    for name in ("connect", "get_turn", "forward", "backward", "apply_update", "end_epoch_remote", "upload_context"):
        assert getattr(RemoteSplitServer, name) is getattr(SplitClient, name), name
    for name in ("open_session", "get_round", "download", "submit"):
        assert getattr(FedSiteClient, name) is getattr(FedClient, name), name
