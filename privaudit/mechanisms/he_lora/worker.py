"""The HE-LoRA worker: computes encrypted × clear products for a data owner, and the wire protocol.

Messages are length-prefixed frames::

    u8 type | u32 meta length | u64 body length | meta (UTF-8 JSON object) | body (bytes)

Owner → worker: ``HELLO`` (backend name + parameters; body = the *evaluation* key), ``LOAD_WEIGHT``
(a layer's quantized base weight, clear: base weights are public to the worker by design),
``MATMUL`` (body = ciphertext of quantized rows), ``CLOSE``. Worker → owner: ``OK``, ``RESULT``
(body = encrypted product), ``ERROR`` (UTF-8 message). Bytes are counted on the serialised frames.

The worker never holds a secret key: it is built from the evaluation key alone
(:meth:`privaudit.mechanisms.he_lora.backend.HEBackend.server`), and the owner's side
(:class:`WorkerClient`) only ever sends the frames above. What the worker learns in the clear:
message sizes, shapes (rows per exchange, layer ids), order and timing.

* :func:`serve` — a socket server on loopback (127.0.0.1 only), ``privaudit he-worker --port P``;
* :class:`InProcessTransport` — the same worker in-process (tests, ``simulate`` mode);
* :class:`WorkerClient` — the owner's side: keygen, HELLO, weights, encrypt → MATMUL → decrypt;
  keeps a transcript (:meth:`WorkerClient.worker_view` is "what the worker saw").

This module depends on numpy only (the worker process does not import torch).
"""

from __future__ import annotations

import json
import socket
import struct
import sys
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path
from typing import Any, BinaryIO, Callable

import numpy as np

from privaudit.mechanisms.he_lora.backend import ClientSession, HEBackend, ServerSession, get_backend

PROTOCOL_VERSION = 1
LOOPBACK = "127.0.0.1"
_HEADER = struct.Struct(">BIQ")
MAX_META = 1 << 20
MAX_BODY = 1 << 34


class MsgType(IntEnum):
    HELLO = 1
    LOAD_WEIGHT = 2
    MATMUL = 3
    CLOSE = 4
    OK = 0x81
    RESULT = 0x83
    ERROR = 0xFF


OWNER_TO_WORKER: frozenset[MsgType] = frozenset({MsgType.HELLO, MsgType.LOAD_WEIGHT, MsgType.MATMUL,
                                                 MsgType.CLOSE})


@dataclass(frozen=True)
class Message:
    type: MsgType
    meta: dict[str, Any] = field(default_factory=dict)
    body: bytes = b""


def _meta_bytes(meta: dict[str, Any]) -> bytes:
    return json.dumps(meta, sort_keys=True, separators=(",", ":")).encode("utf-8")


def encode_message(msg: Message) -> bytes:
    meta = _meta_bytes(msg.meta)
    return _HEADER.pack(int(msg.type), len(meta), len(msg.body)) + meta + msg.body


def frame_nbytes(meta: dict[str, Any], body_nbytes: int) -> int:
    """Size of the frame of a message with ``meta`` and a body of ``body_nbytes`` bytes."""
    return _HEADER.size + len(_meta_bytes(meta)) + int(body_nbytes)


def _parse_header(head: bytes) -> tuple[MsgType, int, int]:
    kind, mlen, blen = _HEADER.unpack(head)
    try:
        mtype = MsgType(kind)
    except ValueError:
        raise ValueError(f"message: unknown type {kind}") from None
    if mlen > MAX_META or blen > MAX_BODY:
        raise ValueError(f"message: oversized frame (meta {mlen} B, body {blen} B)")
    return mtype, mlen, blen


def _parse_meta(raw: bytes) -> dict[str, Any]:
    meta = json.loads(raw.decode("utf-8")) if raw else {}
    if not isinstance(meta, dict):
        raise ValueError("message: meta is not a JSON object")
    return meta


def decode_message(data: bytes) -> Message:
    """Parse one complete frame (exactly)."""
    if len(data) < _HEADER.size:
        raise ValueError("message: truncated header")
    mtype, mlen, blen = _parse_header(data[:_HEADER.size])
    if len(data) != _HEADER.size + mlen + blen:
        raise ValueError("message: frame length does not match its header")
    meta = _parse_meta(data[_HEADER.size:_HEADER.size + mlen])
    return Message(mtype, meta, bytes(data[_HEADER.size + mlen:]))


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(min(n - len(buf), 1 << 22))
        if not chunk:
            raise ConnectionError("connection closed mid-frame" if buf else "connection closed")
        buf.extend(chunk)
    return bytes(buf)


def recv_frame(sock: socket.socket) -> bytes:
    """One complete frame from a socket (raw bytes, header included)."""
    head = _recv_exact(sock, _HEADER.size)
    _, mlen, blen = _parse_header(head)
    return head + _recv_exact(sock, mlen + blen)


def read_frames(stream: BinaryIO) -> list[Message]:
    """All frames of a recorded byte stream (e.g. a saved transcript)."""
    out: list[Message] = []
    while True:
        head = stream.read(_HEADER.size)
        if not head:
            return out
        if len(head) < _HEADER.size:
            raise ValueError("transcript: truncated frame header")
        _, mlen, blen = _parse_header(head)
        rest = stream.read(mlen + blen)
        if len(rest) != mlen + blen:
            raise ValueError("transcript: truncated frame")
        out.append(decode_message(head + rest))


# ----------------------------------------------------------------------------------------------
# the worker (protocol state machine)
# ----------------------------------------------------------------------------------------------
class Worker:
    """Serves one owner session. ``allow_plaintext`` admits the ``simulate`` backend (in-process
    only: a remote worker refuses it, since its messages are not encrypted)."""

    def __init__(self, *, allow_plaintext: bool = False) -> None:
        self.allow_plaintext = allow_plaintext
        self.session: ServerSession | None = None
        self.backend: HEBackend | None = None
        self.weights: dict[int, np.ndarray] = {}
        self.closed = False
        self.products = 0

    def handle(self, msg: Message) -> Message:
        try:
            return self._handle(msg)
        except (ValueError, KeyError, TypeError) as exc:
            return Message(MsgType.ERROR, {}, str(exc).encode("utf-8"))

    def _handle(self, msg: Message) -> Message:
        if msg.type not in OWNER_TO_WORKER:
            raise ValueError(f"message: {msg.type.name} is not a request")
        if msg.type == MsgType.HELLO:
            if msg.meta.get("protocol") != PROTOCOL_VERSION:
                raise ValueError(f"protocol: worker speaks version {PROTOCOL_VERSION}, got {msg.meta.get('protocol')!r}")
            backend = get_backend(str(msg.meta.get("backend")), msg.meta.get("parameters") or {})
            if not backend.encrypted and not self.allow_plaintext:
                raise ValueError(f"backend: {backend.name!r} sends plaintext; this worker only accepts encrypted data")
            self.backend, self.session = backend, backend.server(msg.body)
            self.weights.clear()
            return Message(MsgType.OK)
        if msg.type == MsgType.CLOSE:
            self.closed = True
            return Message(MsgType.OK)
        if self.session is None:
            raise ValueError("message: HELLO first")
        if msg.type == MsgType.LOAD_WEIGHT:
            wid, k, n = int(msg.meta["id"]), int(msg.meta["k"]), int(msg.meta["n"])
            dtype = np.dtype(str(msg.meta["dtype"]))
            if dtype not in (np.dtype("<i1"), np.dtype("<i2"), np.dtype("<i4")):
                raise ValueError(f"dtype: unsupported weight dtype {dtype}")
            if len(msg.body) != k * n * dtype.itemsize:
                raise ValueError("body: weight size does not match k*n")
            self.weights[wid] = np.frombuffer(msg.body, dtype=dtype).reshape(k, n).astype(np.int64)
            return Message(MsgType.OK)
        wid, rows = int(msg.meta["id"]), int(msg.meta["rows"])
        if wid not in self.weights:
            raise ValueError(f"id: no weight {wid} loaded")
        weight = self.weights[wid]
        out = self.session.matmul(msg.body, rows, weight)
        self.products += 1
        return Message(MsgType.RESULT, {"id": wid, "n": int(weight.shape[1]), "rows": rows}, out)

    def handle_frame(self, data: bytes) -> bytes:
        try:
            msg = decode_message(data)
        except ValueError as exc:
            return encode_message(Message(MsgType.ERROR, {}, str(exc).encode("utf-8")))
        return encode_message(self.handle(msg))


# ----------------------------------------------------------------------------------------------
# transports
# ----------------------------------------------------------------------------------------------
class Transport(ABC):
    """Moves one request frame to the worker and returns its reply frame."""

    remote: bool = False

    @abstractmethod
    def exchange(self, frame: bytes) -> bytes: ...

    def close(self) -> None:
        pass


class InProcessTransport(Transport):
    """A :class:`Worker` in this process (``received`` keeps every frame it got when ``record``)."""

    def __init__(self, *, allow_plaintext: bool = True, record: bool = False) -> None:
        self.worker = Worker(allow_plaintext=allow_plaintext)
        self.record = record
        self.received: list[bytes] = []

    def exchange(self, frame: bytes) -> bytes:
        if self.record:
            self.received.append(bytes(frame))
        return self.worker.handle_frame(frame)


class SocketTransport(Transport):
    """A worker process listening on loopback."""

    remote = True

    def __init__(self, port: int, host: str = LOOPBACK, timeout: float | None = None) -> None:
        if host not in (LOOPBACK, "localhost"):
            raise ValueError(f"worker: only loopback ({LOOPBACK}) is supported, got {host!r}")
        if not (isinstance(port, int) and 0 < port < 65536):
            raise ValueError(f"worker: port must be in 1..65535, got {port!r}")
        try:
            self.sock = socket.create_connection((LOOPBACK, port), timeout=timeout)
        except OSError as exc:
            raise ValueError(f"worker: cannot connect to {LOOPBACK}:{port} ({exc.strerror or exc})") from None
        self.sock.settimeout(None)

    def exchange(self, frame: bytes) -> bytes:
        self.sock.sendall(frame)
        return recv_frame(self.sock)

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:  # pragma: no cover
            pass


def parse_worker_address(address: str) -> int:
    """Port of ``"127.0.0.1:PORT"``, ``"localhost:PORT"`` or ``"PORT"`` (loopback only)."""
    text = str(address).strip()
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = LOOPBACK, text
    if host not in (LOOPBACK, "localhost"):
        raise ValueError(f"worker: only loopback workers are supported ({LOOPBACK}:PORT), got {address!r}")
    try:
        value = int(port)
    except ValueError:
        raise ValueError(f"worker: bad port in {address!r}") from None
    if not 0 < value < 65536:
        raise ValueError(f"worker: port must be in 1..65535, got {value}")
    return value


# ----------------------------------------------------------------------------------------------
# the owner's side
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ExchangeRecord:
    """One request/reply: what was sent (type, meta, body if kept) and the frame sizes each way."""

    type: str
    meta: dict[str, Any]
    bytes_to_worker: int
    bytes_from_worker: int
    body: bytes | None = None


class WorkerClient:
    """The owner's connection to a worker. Holds the secret key; sends only evaluation keys, public
    quantized weights and ciphertexts. ``keep_payloads`` keeps every frame sent (memory!)."""

    def __init__(self, backend: HEBackend, transport: Transport, *, keep_payloads: bool = False,
                 keys: ClientSession | None = None) -> None:
        if transport.remote and not backend.encrypted:
            raise ValueError(f"backend: {backend.name!r} is not encrypted; it may only use an in-process worker")
        self.backend = backend
        self.transport = transport
        self.keep_payloads = keep_payloads
        self.keys: ClientSession | None = keys  # None: generated at connect()
        self.transcript: list[ExchangeRecord] = []
        self.frames_sent: list[bytes] = []
        self._shapes: dict[int, tuple[int, int]] = {}

    # -- framing --------------------------------------------------------------------------------
    def _request(self, msg: Message, on_send: Callable[[int], None] | None = None) -> Message:
        frame = encode_message(msg)
        if on_send is not None:
            on_send(len(frame))
        reply_frame = self.transport.exchange(frame)
        self.transcript.append(ExchangeRecord(msg.type.name, dict(msg.meta), len(frame), len(reply_frame),
                                              msg.body if self.keep_payloads else None))
        if self.keep_payloads:
            self.frames_sent.append(frame)
        reply = decode_message(reply_frame)
        if reply.type == MsgType.ERROR:
            raise RuntimeError(f"worker: {reply.body.decode('utf-8', 'replace')}")
        return reply

    # -- session --------------------------------------------------------------------------------
    def hello_message(self) -> Message:
        if self.keys is None:
            self.keys = self.backend.keygen()
        meta = {"backend": self.backend.name, "parameters": self.backend.parameters(),
                "protocol": PROTOCOL_VERSION}
        return Message(MsgType.HELLO, meta, self.keys.server_key())

    def connect(self) -> None:
        """Generate keys here and send the evaluation key (once)."""
        self._request(self.hello_message())

    def weight_message(self, wid: int, q_weight: np.ndarray, n_bits: int) -> Message:
        dtype = "<i1" if n_bits <= 8 else "<i2"
        k, n = q_weight.shape
        body = np.ascontiguousarray(q_weight, dtype=dtype).tobytes()
        return Message(MsgType.LOAD_WEIGHT, {"dtype": dtype, "id": int(wid), "k": int(k), "n": int(n)}, body)

    def load_weight(self, wid: int, q_weight: np.ndarray, n_bits: int) -> None:
        self._request(self.weight_message(wid, q_weight, n_bits))
        self._shapes[int(wid)] = (int(q_weight.shape[0]), int(q_weight.shape[1]))

    def matmul(self, wid: int, q_rows: np.ndarray) -> np.ndarray:
        """Encrypt ``q_rows`` (rows, k), have the worker multiply by weight ``wid``, decrypt (rows, n)."""
        if self.keys is None:
            raise RuntimeError("worker: connect() first")
        k, n = self._shapes[int(wid)]
        rows = int(q_rows.shape[0])
        if q_rows.shape[1] != k:
            raise ValueError(f"rows: expected {k} columns for weight {wid}, got {q_rows.shape[1]}")
        blob = self.keys.encrypt_rows(q_rows)
        reply = self._request(Message(MsgType.MATMUL, {"id": int(wid), "rows": rows}, blob))
        return self.keys.decrypt_product(reply.body, rows, n)

    def close(self) -> None:
        try:
            if self.keys is not None:
                self._request(Message(MsgType.CLOSE))
        except (OSError, RuntimeError, ConnectionError):
            pass
        finally:
            self.transport.close()

    # -- sizes and views --------------------------------------------------------------------------
    def weight_shape(self, wid: int) -> tuple[int, int]:
        """(k, n) of loaded weight ``wid``."""
        return self._shapes[int(wid)]

    def matmul_nbytes(self, wid: int, rows: int) -> tuple[int, int]:
        """Exact (request, reply) frame sizes of one MATMUL with weight ``wid`` on ``rows`` rows."""
        k, n = self._shapes[int(wid)]
        to = frame_nbytes({"id": int(wid), "rows": int(rows)}, self.backend.request_nbytes(rows, k))
        back = frame_nbytes({"id": int(wid), "n": n, "rows": int(rows)}, self.backend.response_nbytes(rows, n))
        return to, back

    def totals(self, types: tuple[str, ...] | None = None) -> tuple[int, int]:
        """(bytes to worker, bytes from worker) over the transcript (optionally of some types)."""
        recs = [r for r in self.transcript if types is None or r.type in types]
        return sum(r.bytes_to_worker for r in recs), sum(r.bytes_from_worker for r in recs)

    def worker_view(self) -> list[Message]:
        """What the worker saw: every message sent, in order (bodies only with ``keep_payloads``)."""
        if self.keep_payloads:
            return [decode_message(f) for f in self.frames_sent]
        return [Message(MsgType[r.type], dict(r.meta), b"") for r in self.transcript]

    def save_transcript(self, path: str | Path) -> int:
        """Write the exact byte stream sent to the worker (needs ``keep_payloads``); returns bytes written."""
        if not self.keep_payloads:
            raise ValueError("transcript: the client was not keeping payloads (keep_payloads=False)")
        data = b"".join(self.frames_sent)
        Path(path).write_bytes(data)
        return len(data)


# ----------------------------------------------------------------------------------------------
# the socket server
# ----------------------------------------------------------------------------------------------
def serve(port: int = 0, *, once: bool = False, announce: Callable[[str], None] | None = None) -> None:
    """Listen on 127.0.0.1:``port`` (0: a free port) and serve owners one at a time.

    Announces ``privaudit he-worker listening on 127.0.0.1:PORT`` (stdout by default) once ready.
    ``once``: exit after the first owner's session ends.
    """
    if not (isinstance(port, int) and 0 <= port < 65536):
        raise ValueError(f"port: must be in 0..65535, got {port!r}")
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        srv.bind((LOOPBACK, port))
    except OSError as exc:
        srv.close()
        raise ValueError(f"port: cannot listen on {LOOPBACK}:{port} ({exc.strerror or exc})") from None
    srv.listen(1)
    line = f"privaudit he-worker listening on {LOOPBACK}:{srv.getsockname()[1]}"
    if announce is None:
        print(line, flush=True)
    else:
        announce(line)
    try:
        while True:
            conn, _ = srv.accept()
            with conn:
                _serve_connection(conn)
            if once:
                return
    finally:
        srv.close()


def _serve_connection(conn: socket.socket) -> None:
    worker = Worker(allow_plaintext=False)
    while not worker.closed:
        try:
            frame = recv_frame(conn)
        except (ConnectionError, ValueError):
            return
        try:
            conn.sendall(worker.handle_frame(frame))
        except OSError:
            return


def main(argv: list[str] | None = None) -> None:  # pragma: no cover - convenience entry point
    import argparse

    ap = argparse.ArgumentParser(prog="privaudit-he-worker")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--once", action="store_true")
    args = ap.parse_args(argv)
    try:
        serve(args.port, once=args.once)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


__all__ = [
    "ExchangeRecord",
    "InProcessTransport",
    "LOOPBACK",
    "Message",
    "MsgType",
    "OWNER_TO_WORKER",
    "PROTOCOL_VERSION",
    "SocketTransport",
    "Transport",
    "Worker",
    "WorkerClient",
    "decode_message",
    "encode_message",
    "frame_nbytes",
    "parse_worker_address",
    "read_frames",
    "serve",
]
