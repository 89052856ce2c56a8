"""Chunked payloads: round trips, every refusal of a broken stream, and a real gRPC stream past the 4 MiB limit."""
from __future__ import annotations

import hashlib
import os
from concurrent import futures

import grpc
import pytest

from splitfl.net import PROTOCOL_VERSION
from splitfl.net.chunks import (
    DEFAULT_CHUNK_SIZE,
    ChecksumMismatch,
    Chunk,
    ChunkError,
    PayloadTooLarge,
    Reassembler,
    assemble,
    assemble_into,
    open_stream,
    read_transfer,
    split_payload,
)
from splitfl.net.proto import splitfl_pb2 as pb
from splitfl.net.proto import splitfl_pb2_grpc as pb_grpc

BIG = 9 * 1000 * 1000 + 123  # over gRPC's 4 MiB default message limit, not a multiple of the chunk size
LIMIT = 64 << 20


@pytest.fixture(scope="module")
def big() -> bytes:
    return os.urandom(BIG)


def _chunks(data: bytes, chunk_size: int = 4) -> list[Chunk]:
    return list(split_payload(data, chunk_size=chunk_size, transfer_id=b"T" * 16))


# ------------------------------------------------------------------ round trips


@pytest.mark.parametrize("size", [0, 1, DEFAULT_CHUNK_SIZE, DEFAULT_CHUNK_SIZE + 1])
def test_round_trip_small_and_boundary_sizes(size):
    data = os.urandom(size)
    chunks = list(split_payload(data))
    assert len(chunks) == max(1, -(-size // DEFAULT_CHUNK_SIZE))
    assert all(c.total_chunks == len(chunks) and c.total_size == size for c in chunks)
    assert [c.index for c in chunks] == list(range(len(chunks)))
    assert all(len(c.data) <= DEFAULT_CHUNK_SIZE for c in chunks)
    assert [bool(c.sha256) for c in chunks] == [False] * (len(chunks) - 1) + [True]
    assert chunks[-1].sha256 == hashlib.sha256(data).digest()
    assert assemble(chunks, max_bytes=size) == data  # a limit equal to the size is enough


def test_empty_payload_is_one_empty_chunk():
    (c,) = split_payload(b"")
    assert c.total_chunks == 1 and c.total_size == 0 and c.data == b"" and len(c.sha256) == 32
    assert assemble([c], max_bytes=0) == b""


def test_round_trip_multi_chunk_over_the_grpc_limit(big):
    chunks = list(split_payload(big))
    assert len(chunks) == 9 and len({c.transfer_id for c in chunks}) == 1 and len(chunks[0].transfer_id) == 16
    assert assemble(chunks, max_bytes=LIMIT) == big
    # The streaming variant hands the data over in order, one chunk at a time.
    pieces: list[bytes] = []
    info = assemble_into(iter(chunks), pieces.append, max_bytes=LIMIT)
    assert b"".join(pieces) == big and info.size == BIG and info.chunks == 9
    assert info.sha256 == hashlib.sha256(big).digest() and info.transfer_id == chunks[0].transfer_id


def test_split_accepts_views_and_checks_arguments():
    data = bytearray(b"abcdefghij")
    assert assemble(split_payload(memoryview(data), chunk_size=3), 10) == b"abcdefghij"
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError):
            list(split_payload(b"x", chunk_size=bad))
    with pytest.raises(ValueError):
        list(split_payload(b"x", transfer_id=b""))


def test_several_transfers_in_one_stream():
    """SubmitUpdate sends its parts one after another in one stream; read_transfer takes exactly one."""
    a, b = b"plaintext part", b"ciphertext part" * 3
    stream = iter(list(split_payload(a, 4)) + list(split_payload(b, 5)))
    got_a, got_b = bytearray(), bytearray()
    ia = read_transfer(stream, 100, got_a.extend)
    ib = read_transfer(stream, 100, got_b.extend)
    assert (bytes(got_a), bytes(got_b)) == (a, b) and ia.transfer_id != ib.transfer_id
    assert next(stream, None) is None


# ------------------------------------------------------------------ refusals


def _refused(chunks, match, max_bytes=1000, cls=ChunkError, **kw):
    with pytest.raises(cls, match=match) as err:
        assemble(chunks, max_bytes, **kw)
    return err.value


def test_tampered_data_fails_the_checksum():
    chunks = _chunks(b"0123456789abcdef")
    chunks[1].data = b"XXXX"
    e = _refused(chunks, r"transfer 5454.*chunk 3: SHA-256 mismatch", cls=ChecksumMismatch)
    assert e.index == 3 and e.transfer_id == b"T" * 16
    assert (e.grpc_code, e.error_code) == ("DATA_LOSS", pb.ERROR_CODE_BAD_CHUNKS)


def test_wrong_or_missing_checksum():
    chunks = _chunks(b"0123456789")
    chunks[-1].sha256 = hashlib.sha256(b"something else").digest()
    _refused(chunks, "chunk 2: SHA-256 mismatch")
    chunks[-1].sha256 = b""
    _refused(chunks, "chunk 2: the last chunk must carry a 32-byte SHA-256, got 0")
    chunks = _chunks(b"0123456789")
    chunks[0].sha256 = chunks[-1].sha256
    _refused(chunks, "chunk 0: carries a SHA-256 but is not the last chunk")


def test_missing_duplicated_and_reordered_chunks():
    chunks = _chunks(b"0123456789abcdef")  # 4 chunks
    _refused([chunks[0], chunks[2], chunks[3]], r"chunk 2: missing chunk\(s\) 1..1 \(expected chunk 1\)")
    _refused([chunks[0], chunks[1], chunks[1], chunks[2], chunks[3]], r"chunk 1: duplicate or out of order \(expected chunk 2\)")
    _refused([chunks[1], chunks[0], chunks[2], chunks[3]], r"chunk 1: missing chunk\(s\) 0..0")
    _refused([chunks[0], chunks[2], chunks[1], chunks[3]], "chunk 2: missing")
    e = _refused(chunks[:3], r"stream: ended after 3 of 4 chunks \(12 of 16 bytes\)")
    assert e.index == -1
    _refused([], "no chunks")
    _refused(chunks + [chunks[3]], "chunk 3: arrived after the last chunk")


def test_mixed_transfer_ids():
    a = _chunks(b"0123456789abcdef")
    b = list(split_payload(b"0123456789abcdef", chunk_size=4, transfer_id=b"U" * 16))
    _refused([a[0], b[1], a[2], a[3]], r"chunk 1: belongs to another transfer \(5555")
    _refused(a, "is not the announced", transfer_id=b"U" * 16)
    assert assemble(a, 1000, transfer_id=b"T" * 16) == b"0123456789abcdef"


def test_inconsistent_declarations():
    chunks = _chunks(b"0123456789abcdef")
    chunks[2].total_size = 17
    _refused(chunks, "chunk 2: declares 4 chunks / 17 bytes, earlier chunks 4 / 16")
    chunks = _chunks(b"0123456789abcdef")
    for c in chunks:
        c.total_chunks = 5  # declares one chunk more than it sends
    _refused(chunks, "chunk 3: carries a SHA-256 but is not the last chunk")
    chunks[3].sha256 = b""
    _refused(chunks, "ended after 4 of 5 chunks")
    chunks = _chunks(b"0123456789abcdef")
    for c in chunks:
        c.total_chunks = 3  # the third chunk is declared last but 4 bytes are missing
    _refused(chunks[:3], "chunk 2: last chunk, but 12 of 16 bytes arrived")


def test_empty_chunks_and_absurd_chunk_counts_are_refused():
    chunks = _chunks(b"01234567")
    chunks.insert(1, Chunk(transfer_id=b"T" * 16, index=1, total_chunks=2, total_size=8, data=b""))
    _refused(chunks, "chunk 1: empty chunk in a non-empty payload")
    # A sender may not declare more chunks than bytes (no endless streams of empty chunks).
    _refused([Chunk(transfer_id=b"T", index=0, total_chunks=1 << 40, total_size=10, data=b"x")], "declares 1099511627776 chunks")
    _refused([Chunk(transfer_id=b"T", index=0, total_chunks=0, total_size=0)], "declares 0 chunks")
    _refused([Chunk(transfer_id=b"", index=0, total_chunks=1, total_size=0)], "transfer id of 0 bytes")
    _refused([Chunk(transfer_id=b"x" * 65, index=0, total_chunks=1, total_size=0)], "transfer id of 65 bytes")


def test_oversize_declared_is_refused_at_the_first_chunk_before_buffering():
    sink_calls: list[bytes] = []
    r = Reassembler(1000, sink_calls.append)
    huge = Chunk(transfer_id=b"T" * 16, index=0, total_chunks=1 << 20, total_size=1 << 40, data=b"x")
    with pytest.raises(PayloadTooLarge, match=r"chunk 0: declared size 1099511627776 bytes is over the limit of 1000"):
        r.feed(huge)
    assert sink_calls == [] and r.received == 0
    e = _refused(_chunks(b"x" * 1001), "over the limit of 1000", cls=PayloadTooLarge)
    assert isinstance(e, ChunkError) and isinstance(e, ValueError) and e.index == 0
    assert (e.grpc_code, e.error_code) == ("RESOURCE_EXHAUSTED", pb.ERROR_CODE_TOO_LARGE)


def test_oversize_actual_is_refused_at_the_chunk_that_brings_it():
    """A sender that declares little and sends more is stopped at the first byte past its declaration."""
    chunks = _chunks(b"01234567")  # declared 8 bytes in 2 chunks
    chunks[1].data = b"4567" + b"Z" * 5000
    seen: list[int] = []
    with pytest.raises(ChunkError, match=r"chunk 1: data runs past the declared size \(5008 > 8 bytes\)") as err:
        assemble_into(chunks, lambda d: seen.append(len(d)), max_bytes=100)
    assert isinstance(err.value, PayloadTooLarge) and seen == [4]  # nothing of the oversize chunk was handed on
    chunks = _chunks(b"01234567")
    chunks[0].data = b"012345678"  # past the declaration but within the limit: a plain ChunkError
    e = _refused(chunks, "chunk 0: data runs past the declared size", max_bytes=100)
    assert not isinstance(e, PayloadTooLarge)


def test_per_chunk_limit():
    _refused(_chunks(b"0123456789", chunk_size=8), "chunk 0: 8 bytes of data, over the chunk limit of 4", max_chunk_bytes=4)


def test_open_stream_separates_the_first_message_from_the_chunks():
    header = pb.RequestHeader(protocol_version=PROTOCOL_VERSION, run_id="r", site_id=1, sequence=1)
    chunks = _chunks(b"0123456789")
    msgs = [pb.ForwardRequest(header=header, call=pb.ForwardCall(train=True), chunk=chunks[0])]
    msgs += [pb.ForwardRequest(chunk=c) for c in chunks[1:]]
    first, it = open_stream(msgs, ("header", "call"))
    assert first.header.site_id == 1 and assemble(it, 100) == b"0123456789"
    # The first message need not carry a chunk.
    first, it = open_stream([pb.ForwardRequest(header=header)] + [pb.ForwardRequest(chunk=c) for c in chunks])
    assert assemble(it, 100) == b"0123456789"
    bad = msgs[:1] + [pb.ForwardRequest(header=header, chunk=chunks[1])]
    with pytest.raises(ChunkError, match="stream message 1 sets header, allowed in the first message only"):
        assemble(open_stream(bad)[1], 100)
    with pytest.raises(ChunkError, match="stream message 1 carries no chunk"):
        assemble(open_stream(msgs[:1] + [pb.ForwardRequest()])[1], 100)
    with pytest.raises(ChunkError, match="empty stream"):
        open_stream([])


# ------------------------------------------------------------------ a real gRPC stream


class _EchoSplit(pb_grpc.SplitServiceServicer):
    """Forward echoes the streamed payload back as a chunk stream; the server keeps gRPC's default limits."""

    def Forward(self, request_iterator, context):
        first, chunks = open_stream(request_iterator, ("header", "call"))
        if first.header.protocol_version != PROTOCOL_VERSION:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, "unsupported version")
        try:
            payload = assemble(chunks, max_bytes=LIMIT)
        except ChunkError as exc:
            context.abort(getattr(grpc.StatusCode, exc.grpc_code), str(exc))
        header = pb.ResponseHeader(protocol_version=PROTOCOL_VERSION, sequence=first.header.sequence)
        for i, chunk in enumerate(split_payload(payload)):
            yield pb.ForwardResponse(header=header, chunk=chunk) if i == 0 else pb.ForwardResponse(chunk=chunk)


@pytest.fixture(scope="module")
def echo_stub():
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))  # default options: 4 MiB receive limit
    pb_grpc.add_SplitServiceServicer_to_server(_EchoSplit(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    assert port > 0
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")  # default options too
    try:
        yield pb_grpc.SplitServiceStub(channel)
    finally:
        channel.close()
        server.stop(grace=None)


def _requests(payload: bytes, chunks=None):
    header = pb.RequestHeader(protocol_version=PROTOCOL_VERSION, run_id="test-run", site_id=0, sequence=7)
    for i, chunk in enumerate(chunks if chunks is not None else split_payload(payload)):
        if i == 0:
            yield pb.ForwardRequest(header=header, call=pb.ForwardCall(train=True, encoding=pb.PAYLOAD_ENCODING_TENSOR), chunk=chunk)
        else:
            yield pb.ForwardRequest(chunk=chunk)


def test_grpc_stream_carries_9_mb_both_ways_with_default_limits(echo_stub, big):
    responses = echo_stub.Forward(_requests(big), timeout=30)
    first, chunks = open_stream(responses)
    assert first.header.sequence == 7 and first.header.protocol_version == PROTOCOL_VERSION
    assert assemble(chunks, max_bytes=LIMIT) == big


def test_grpc_refuses_the_same_payload_as_one_message(echo_stub, big):
    """The control: without chunking, 9 MB in one message exceeds the server's default 4 MiB limit."""
    whole = list(split_payload(big, chunk_size=BIG))
    assert len(whole) == 1
    with pytest.raises(grpc.RpcError) as err:
        list(echo_stub.Forward(_requests(big, whole), timeout=30))
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_grpc_server_reports_a_broken_stream(echo_stub):
    chunks = _chunks(b"0123456789abcdef")
    chunks[2].data = b"XXXX"
    with pytest.raises(grpc.RpcError) as err:
        list(echo_stub.Forward(_requests(b"", chunks), timeout=30))
    assert err.value.code() == grpc.StatusCode.DATA_LOSS and "chunk 3: SHA-256 mismatch" in err.value.details()
    chunks = _chunks(b"0123456789abcdef")
    with pytest.raises(grpc.RpcError) as err:
        list(echo_stub.Forward(_requests(b"", [chunks[0], chunks[2], chunks[3]]), timeout=30))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "missing chunk(s) 1..1" in err.value.details()
