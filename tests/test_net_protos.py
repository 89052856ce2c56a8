"""The committed gRPC code matches protos/splitfl.proto, imports, and declares the services as documented."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from splitfl.net import PROTOCOL_VERSION, STATUS_METHODS, SUPPORTED_VERSIONS, codegen
from splitfl.net.proto import splitfl_pb2 as pb
from splitfl.net.proto import splitfl_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parents[1]
PROTO = ROOT / "protos" / "splitfl.proto"

# (name, client streams, server streams): the shape of every RPC, as protos/README.md lists them.
SPLIT_RPCS = [
    ("Status", False, False),
    ("Hello", False, False),
    ("UploadContext", True, False),
    ("GetTurn", False, False),
    ("Forward", True, True),
    ("Backward", True, True),
    ("Predict", True, True),
    ("ApplyUpdate", True, False),
    ("EndEpoch", False, False),
    ("UploadRelay", True, False),
    ("DownloadRelay", False, True),
    ("ReportEval", False, False),
    ("UploadWeights", True, False),
    ("DownloadWeights", False, True),
]
FED_RPCS = [
    ("Status", False, False),
    ("Join", False, True),
    ("GetRound", False, False),
    ("DownloadModel", False, True),
    ("SubmitUpdate", True, False),
    ("SecAggSubmit", True, False),
    ("SecAggFetch", False, True),
]


def _generated_version(text: str, pattern: str) -> tuple[int, ...]:
    m = re.search(pattern, text)
    assert m, f"no version stamp matching {pattern!r}"
    return tuple(int(x) for x in m.groups())


def test_committed_code_matches_a_fresh_generation(tmp_path):
    pytest.importorskip("grpc_tools", reason="grpcio-tools (dev extra) is needed to regenerate")
    from grpc_tools import grpc_version

    committed = (codegen.OUT_DIR / "splitfl_pb2_grpc.py").read_text()
    made_with = re.search(r"GRPC_GENERATED_VERSION = '([^']+)'", committed).group(1)
    if grpc_version.VERSION != made_with:
        pytest.skip(
            f"the committed code was made with grpcio-tools {made_with}, this is {grpc_version.VERSION}: "
            "their output differs in version stamps; pin grpcio-tools to compare"
        )
    fresh = codegen.generate(tmp_path)
    assert sorted(p.name for p in fresh) == sorted(codegen.generated_names())
    stale = [p.name for p in fresh if p.read_bytes() != (codegen.OUT_DIR / p.name).read_bytes()]
    assert not stale, f"{stale} differ from protos/splitfl.proto: run python -m splitfl.net.codegen"
    # The service module imports the messages package-relatively (works inside splitfl.net.proto).
    text = (tmp_path / "splitfl_pb2_grpc.py").read_text()
    assert "from . import splitfl_pb2 as splitfl__pb2" in text
    assert not re.search(r"^import splitfl_pb2", text, re.MULTILINE)


def test_pinned_dependencies_cover_the_generated_code():
    """pyproject's lower bounds must admit no runtime older than the generated code demands."""
    tomllib = pytest.importorskip("tomllib")
    pytest.importorskip("packaging")
    from packaging.requirements import Requirement
    from packaging.version import Version

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    reqs = {r.name: r for r in map(Requirement, deps)}
    pb_text = (codegen.OUT_DIR / "splitfl_pb2.py").read_text()
    gencode = _generated_version(pb_text, r"Domain\.PUBLIC,\s*(\d+),\s*(\d+),\s*(\d+),")
    grpc_text = (codegen.OUT_DIR / "splitfl_pb2_grpc.py").read_text()
    grpc_made = _generated_version(grpc_text, r"GRPC_GENERATED_VERSION = '(\d+)\.(\d+)\.(\d+)'")
    for name, needed in (("protobuf", gencode), ("grpcio", grpc_made)):
        need = Version(".".join(map(str, needed)))
        lows = [Version(s.version) for s in reqs[name].specifier if s.operator in (">=", "==", "~=")]
        assert lows and max(lows) >= need, (
            f"pyproject.toml allows {name}{reqs[name].specifier}, but the generated code needs {name}>={need}"
        )


def test_generated_modules_import_and_services_have_the_documented_shape():
    assert pb.PROTOCOL_VERSION_1 == PROTOCOL_VERSION and PROTOCOL_VERSION in SUPPORTED_VERSIONS
    for service, rpcs in (("SplitService", SPLIT_RPCS), ("FederationService", FED_RPCS)):
        desc = pb.DESCRIPTOR.services_by_name[service]
        got = [(m.name, m.client_streaming, m.server_streaming) for m in desc.methods]
        assert got == rpcs, service
        assert hasattr(pb_grpc, f"{service}Stub") and hasattr(pb_grpc, f"add_{service}Servicer_to_server")
    assert STATUS_METHODS == ("/splitfl.v1.SplitService/Status", "/splitfl.v1.FederationService/Status")
    assert pb.DESCRIPTOR.package == "splitfl.v1"


def test_every_request_carries_a_header_and_every_response_a_response_header():
    for name in ("SplitService", "FederationService"):
        for m in pb.DESCRIPTOR.services_by_name[name].methods:
            req, resp = m.input_type, m.output_type
            assert req.fields_by_name["header"].message_type.name == "RequestHeader", m.full_name
            assert resp.fields_by_name["header"].message_type.name == "ResponseHeader", m.full_name
            # Every streamed side moves its payload as Chunk messages.
            for side, streams in ((req, m.client_streaming), (resp, m.server_streaming)):
                if streams:
                    assert side.fields_by_name["chunk"].message_type.name == "Chunk", (m.full_name, side.name)


def test_every_definition_in_the_proto_is_commented():
    lines = PROTO.read_text().splitlines()
    definition = re.compile(r"^\s*(message|enum|service|rpc)\b|^\s*(repeated |optional )?[\w.]+ \w+ = \d+;|^\s*[A-Z0-9_]+ = \d+;")
    bare = [
        f"{i + 1}: {line.strip()}"
        for i, line in enumerate(lines)
        if definition.match(line) and not lines[i - 1].strip().startswith("//")
    ]
    assert not bare, "uncommented definitions in protos/splitfl.proto:\n" + "\n".join(bare)


def test_error_detail_round_trips_as_trailing_metadata_value():
    detail = pb.ErrorDetail(code=pb.ERROR_CODE_UNSUPPORTED_VERSION, message="version 2 not spoken", supported_versions=[1])
    again = pb.ErrorDetail.FromString(detail.SerializeToString())
    assert again.code == pb.ERROR_CODE_UNSUPPORTED_VERSION and list(again.supported_versions) == [1]


def test_secagg_message_types_match_the_blob_type_bytes():
    from splitfl.fed import secagg

    for cls, value in (
        (secagg.AdvertiseKeys, pb.SECAGG_MESSAGE_TYPE_ADVERTISE_KEYS),
        (secagg.KeyBroadcast, pb.SECAGG_MESSAGE_TYPE_KEY_BROADCAST),
        (secagg.ShareKeys, pb.SECAGG_MESSAGE_TYPE_SHARE_KEYS),
        (secagg.ShareDelivery, pb.SECAGG_MESSAGE_TYPE_SHARE_DELIVERY),
        (secagg.MaskedInput, pb.SECAGG_MESSAGE_TYPE_MASKED_INPUT),
        (secagg.UnmaskRequest, pb.SECAGG_MESSAGE_TYPE_UNMASK_REQUEST),
        (secagg.UnmaskResponse, pb.SECAGG_MESSAGE_TYPE_UNMASK_RESPONSE),
    ):
        assert cls.TYPE == value, cls.__name__
