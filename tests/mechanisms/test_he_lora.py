"""HE-LoRA: remote layers, modes (clear / simulate / execute), the worker protocol, the ledger, and an
end-to-end encrypted run through a separate worker process."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from privaudit.ledger.events import EncryptedEvent, GaussianEvent, PlaintextEvent
from privaudit.ledger.ledger import Ledger, verify_ledger
from privaudit.config import parse_config, resolve_plan
from privaudit.config import register_mechanism
from privaudit.mechanisms.he_lora.backend import ClientSession, get_backend, glwe_available, quantize_channels, quantize_rows
from privaudit.mechanisms.he_lora.mechanism import (
    RELEASED_WITHOUT_NOISE,
    HEEngine,
    HESettings,
    RemoteLinear,
    fit,
    install,
    pad_batch,
    planned_events,
    remote_candidates,
    uninstall,
)
from privaudit.mechanisms.he_lora.worker import (
    OWNER_TO_WORKER,
    InProcessTransport,
    Message,
    MsgType,
    Transport,
    Worker,
    WorkerClient,
    decode_message,
    encode_message,
)
from privaudit.models import LoraSettings, apply_lora, load_base_model

register_mechanism("he_lora", "privaudit.mechanisms.he_lora.mechanism")
needs_glwe = pytest.mark.skipif(not glwe_available(), reason="concrete-ml-extensions not installed")
GLWE_NOISE = 256  # bound on the decryption noise in accumulator units (tens measured)
REPO = Path(__file__).resolve().parents[2]


def tiny_model(kind: str = "tiny-gpt2", seed: int = 0, **overrides: Any) -> tuple[nn.Module, Any]:
    defaults: dict[str, Any] = ({"n_embd": 16, "n_layer": 1, "n_head": 2} if kind == "tiny-gpt2" else
                                {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                                 "num_attention_heads": 2, "num_key_value_heads": 1})
    model, tok = load_base_model(kind, "causal_lm", seed=seed, **{**defaults, **overrides})
    targets = ["c_attn", "c_fc"] if kind == "tiny-gpt2" else ["q_proj", "up_proj"]
    model = apply_lora(model, LoraSettings(rank=4, target_modules=targets), seed=seed)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # non-zero B so that the LoRA branch is active
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return model, tok


def forward_backward(model: nn.Module, ids: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    logits = model(**ids).logits
    (logits.float() ** 2).mean().backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return logits.detach(), grads


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-12))


# ----------------------------------------------------------------------------------------------
# remote layers and modes
# ----------------------------------------------------------------------------------------------
def test_remote_candidates_are_the_frozen_base_linears() -> None:
    model, _ = tiny_model()
    names = [n for n, _ in remote_candidates(model)]
    assert names == [
        "base_model.model.transformer.h.0.attn.c_attn.base_layer",
        "base_model.model.transformer.h.0.attn.c_proj",
        "base_model.model.transformer.h.0.mlp.c_fc.base_layer",
        "base_model.model.transformer.h.0.mlp.c_proj",
    ]
    with_head = [n for n, _ in remote_candidates(model, remote_lm_head=True)]
    assert with_head == names + ["base_model.model.lm_head"]
    llama, _ = tiny_model("tiny-llama")
    lnames = {n.split(".")[-1] if not n.endswith("base_layer") else n.split(".")[-2]
              for n, _ in remote_candidates(llama)}
    assert lnames == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert not any("lora" in n for n, _ in remote_candidates(llama))


def test_clear_mode_reproduces_the_model_and_uninstall_restores_it() -> None:
    model, tok = tiny_model()
    ids = dict(tok(["a short text", "another"], padding=True, return_tensors="pt"))
    keys_before = list(model.state_dict())
    ref_logits, ref_grads = forward_backward(model, ids)
    engine = HEEngine("clear")
    remote = install(model, engine)
    assert len(remote) == 4 and all(isinstance(r, RemoteLinear) for r in remote)
    assert list(model.state_dict()) == keys_before  # same parameter names: adapters stay loadable
    logits, grads = forward_backward(model, ids)
    assert rel(logits, ref_logits) < 1e-5
    for n in ref_grads:
        assert rel(grads[n], ref_grads[n]) < 1e-4, n
    uninstall(model)
    assert not any(isinstance(m, RemoteLinear) for m in model.modules())
    assert torch.equal(forward_backward(model, ids)[0], ref_logits)


@pytest.mark.parametrize("kind", ["tiny-gpt2", "tiny-llama"])
def test_simulate_is_quantized_and_close_to_clear(kind: str) -> None:
    model, tok = tiny_model(kind)
    ids = dict(tok(["quantize me please", "and me"], padding=True, return_tensors="pt"))
    ref_logits, ref_grads = forward_backward(model, ids)
    engine = HEEngine("simulate", n_bits=8)
    install(model, engine)
    engine.start()
    logits, grads = forward_backward(model, ids)
    uninstall(model)
    engine.close()
    assert not torch.equal(logits, ref_logits)  # the quantized path really ran
    assert rel(logits, ref_logits) < 0.05
    for n in ref_grads:
        assert rel(grads[n], ref_grads[n]) < 0.1, n
    # coarser quantization is further away: the comparison can fail
    model2, _ = tiny_model(kind)
    engine2 = HEEngine("simulate", n_bits=3)
    install(model2, engine2)
    engine2.start()
    coarse, _ = forward_backward(model2, ids)
    engine2.close()
    assert rel(coarse, ref_logits) > rel(logits, ref_logits)


def test_accumulator_bound_is_refused_with_the_field_name() -> None:
    model, _ = tiny_model(n_embd=64)  # forward k = 64: 2*12 + 6 > 27
    with pytest.raises(ValueError, match=r"^n_bits: 2\*12 \+ log2\(64\)"):
        install(model, HEEngine("simulate", n_bits=12))
    model, _ = tiny_model(n_embd=64)
    # backward products reduce over the output features (k = 192 for c_attn): 2*10 + 7.58 > 27
    with pytest.raises(ValueError, match=r"^n_bits: 2\*10 .*c_attn\.base_layer \(backward, k=192\)"):
        install(model, HEEngine("simulate", n_bits=10))
    model, _ = tiny_model(n_embd=64)
    install(model, HEEngine("clear", n_bits=12))  # clear products have no accumulator


def test_settings_validation() -> None:
    assert HESettings.from_options({}).mode == "simulate"
    for options, field in (({"mode": "fast"}, "mode"), ({"n_bits": 1}, "n_bits"), ({"colour": 1}, "colour"),
                           ({"worker": "10.0.0.1:5000", "mode": "execute"}, "worker"),
                           ({"worker": "127.0.0.1:5000"}, "worker")):
        with pytest.raises(ValueError, match=rf"^options\.{field}:"):
            HESettings.from_options(options)
    assert HESettings.from_options({"mode": "execute", "worker": "127.0.0.1:5000"}).worker == "127.0.0.1:5000"


def test_pad_batch() -> None:
    batch = {"input_ids": torch.tensor([[5, 6]]), "attention_mask": torch.tensor([[1, 1]]),
             "labels": torch.tensor([[5, 6]])}
    out = pad_batch(batch, 4, 0)
    assert out["input_ids"].tolist() == [[5, 6, 0, 0]]
    assert out["attention_mask"].tolist() == [[1, 1, 0, 0]]
    assert out["labels"].tolist() == [[5, 6, -100, -100]]
    assert pad_batch(batch, 2, 0) is batch


# ----------------------------------------------------------------------------------------------
# worker protocol
# ----------------------------------------------------------------------------------------------
class _FakeRemote(Transport):
    remote = True

    def exchange(self, frame: bytes) -> bytes:  # pragma: no cover - never reached
        raise AssertionError("nothing may be sent")


def test_plaintext_backend_never_goes_remote() -> None:
    with pytest.raises(ValueError, match=r"^mode: 'simulate'"):
        HEEngine("simulate", transport=_FakeRemote())
    with pytest.raises(ValueError, match=r"^backend: 'simulate' is not encrypted"):
        WorkerClient(get_backend("simulate"), _FakeRemote())
    # a worker that only accepts encrypted data refuses a simulate session
    transport = InProcessTransport(allow_plaintext=False)
    client = WorkerClient(get_backend("simulate"), transport)
    with pytest.raises(RuntimeError, match="sends plaintext"):
        client.connect()


def test_protocol_framing_and_errors() -> None:
    msg = Message(MsgType.MATMUL, {"id": 3, "rows": 2}, b"\x00\x01payload")
    assert decode_message(encode_message(msg)) == msg
    worker = Worker(allow_plaintext=True)
    reply = decode_message(worker.handle_frame(encode_message(Message(MsgType.MATMUL, {"id": 0, "rows": 1}))))
    assert reply.type == MsgType.ERROR and b"HELLO first" in reply.body
    reply = decode_message(worker.handle_frame(b"\x03garbage"))
    assert reply.type == MsgType.ERROR
    client = WorkerClient(get_backend("simulate"), InProcessTransport())
    client.connect()
    client.load_weight(0, np.array([[1, -2], [3, 4]]), 8)
    assert client.matmul(0, np.array([[1, 1]])).tolist() == [[4, 2]]
    with pytest.raises(RuntimeError, match="no weight 7"):
        client._request(Message(MsgType.MATMUL, {"id": 7, "rows": 1}, b""))
    with pytest.raises(RuntimeError, match="protocol"):
        client._request(Message(MsgType.HELLO, {"protocol": 99, "backend": "simulate"}))


# ----------------------------------------------------------------------------------------------
# execute (GLWE): products, what the worker receives, byte predictions
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def glwe_keys() -> ClientSession:
    return get_backend("glwe").keygen()


@pytest.fixture(scope="module")
def execute_run(glwe_keys: ClientSession) -> dict[str, Any]:
    """One remote layer (8 -> 6), forward and backward in execute and in simulate mode."""
    torch.manual_seed(0)

    def build() -> nn.Module:
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(8, 6), nn.Tanh())
        for p in net.parameters():
            p.requires_grad_(False)
        return net

    x = torch.randn(3, 8, requires_grad=True)
    out: dict[str, Any] = {"x": x.detach()}
    for mode in ("execute", "simulate"):
        net = build()
        transport = InProcessTransport(record=True)
        engine = HEEngine(mode, 8, transport=transport, keys=glwe_keys if mode == "execute" else None)
        install(net, engine)
        engine.start()
        xi = x.detach().clone().requires_grad_(True)
        y = net[0](xi)
        g = torch.linspace(-1, 1, 18).reshape(3, 6)
        y.backward(g)
        out[mode] = {"y": y.detach(), "dx": xi.grad.detach(), "transport": transport, "engine": engine,
                     "g": g, "weight": net[0].weight.detach().clone()}
        engine.close()
    return out


@needs_glwe
def test_execute_equals_simulate_within_the_scheme_noise(execute_run: dict[str, Any]) -> None:
    ex, sim = execute_run["execute"], execute_run["simulate"]
    w = ex["weight"].double().numpy()  # (out, in)
    # forward: |Δy[t, j]| <= noise · s_x[t] · s_w[j]
    sx = quantize_rows(execute_run["x"].double().numpy(), 8).scale
    sw = quantize_channels(w.T, 8).scale
    bound = GLWE_NOISE * sx[:, None] * sw[None, :]
    dy = (ex["y"] - sim["y"]).double().abs().numpy()
    assert np.all(dy <= bound + 1e-9)
    # backward: grad_x = g · W, through the worker as well
    sg = quantize_rows(ex["g"].double().numpy(), 8).scale
    swb = quantize_channels(w, 8).scale
    ddx = (ex["dx"] - sim["dx"]).double().abs().numpy()
    assert np.all(ddx <= GLWE_NOISE * sg[:, None] * swb[None, :] + 1e-9)
    assert rel(ex["dx"], ex["g"] @ ex["weight"]) < 0.05
    kinds = [r.type for r in ex["engine"].client.transcript]
    assert kinds == ["HELLO", "LOAD_WEIGHT", "LOAD_WEIGHT", "MATMUL", "MATMUL", "CLOSE"]


@needs_glwe
def test_worker_never_receives_a_secret_key(execute_run: dict[str, Any], glwe_keys: ClientSession) -> None:
    transport = execute_run["execute"]["transport"]
    frames = transport.received
    assert frames, "the recording transport saw nothing"
    messages = [decode_message(f) for f in frames]
    assert {m.type for m in messages} <= OWNER_TO_WORKER
    hello = [m for m in messages if m.type == MsgType.HELLO]
    assert len(hello) == 1 and hello[0].body == glwe_keys.server_key()
    assert set(hello[0].meta) == {"backend", "parameters", "protocol"}
    secret = glwe_keys.secret_key_bytes()
    stream = b"".join(frames)
    assert secret not in stream
    step = max(1, (len(secret) - 256) // 16)
    for off in range(0, len(secret) - 256, step):
        assert secret[off:off + 256] not in stream, off
    # nothing on the worker's side refers to the owner's key object
    worker = transport.worker
    assert not any(isinstance(v, ClientSession) for v in vars(worker).values())
    assert not any(isinstance(v, ClientSession) for v in vars(worker.session).values())
    # the MATMUL bodies are ciphertexts, not the quantized rows
    q = quantize_rows(execute_run["x"].double().numpy(), 8).values
    matmul = [m for m in messages if m.type == MsgType.MATMUL]
    assert q.astype("<i8").tobytes() not in matmul[0].body
    assert q.astype(np.uint8).tobytes() not in matmul[0].body


@needs_glwe
def test_predicted_bytes_equal_counted_bytes(execute_run: dict[str, Any]) -> None:
    for mode in ("execute", "simulate"):
        client = execute_run[mode]["engine"].client
        recs = [r for r in client.transcript if r.type == "MATMUL"]
        assert len(recs) == 2
        for r in recs:
            assert client.matmul_nbytes(r.meta["id"], r.meta["rows"]) == (r.bytes_to_worker, r.bytes_from_worker)
        assert client.totals() == (sum(r.bytes_to_worker for r in client.transcript),
                                   sum(r.bytes_from_worker for r in client.transcript))
    glwe_to = sum(r.bytes_to_worker for r in execute_run["execute"]["engine"].client.transcript
                  if r.type == "MATMUL")
    assert glwe_to > 3 * 10_000  # one GLWE per row: ~10 kB, vs 8 bytes per value in clear


@needs_glwe
@pytest.mark.slow
def test_model_execute_equals_simulate(glwe_keys: ClientSession) -> None:
    """A whole (tiny) transformer's forward and LoRA gradients, execute vs simulate."""
    results = {}
    for mode in ("execute", "simulate"):
        model, tok = tiny_model(n_embd=8)
        ids = dict(tok(["hi there"], return_tensors="pt"))
        engine = HEEngine(mode, 8, keys=glwe_keys if mode == "execute" else None)
        install(model, engine)
        engine.start()
        results[mode] = forward_backward(model, ids)
        engine.close()
    (le, ge), (ls, gs) = results["execute"], results["simulate"]
    assert rel(le, ls) < 1e-2
    for n in gs:
        assert rel(ge[n], gs[n]) < 5e-2, n


# ----------------------------------------------------------------------------------------------
# training runs, ledger, DP combination
# ----------------------------------------------------------------------------------------------
def _cfg(mode: str, *, steps: int, private: bool = False, sampling: str = "fixed_batch",
         n_embd: int = 32, max_length: int = 16, batch_size: int = 8, n_people: int = 40,
         extra: dict[str, Any] | None = None) -> Any:
    return parse_config({
        "mechanism": "he_lora", "task": "causal_lm",
        "model": {"name": "tiny-gpt2", "max_length": max_length, "device": "cpu",
                  "overrides": {"n_embd": n_embd, "n_layer": 1, "n_head": 2, "initializer_range": 0.5}},
        "lora": {"rank": 8, "target_modules": ["c_attn", "c_fc"]},
        "data": {"source": "synthetic", "max_heldout": 8,
                 "synthetic": {"n_people": n_people, "records_per_person": 2, "n_canaries": 0}},
        "training": {"steps": steps, "sampling": sampling, "batch_size": batch_size, "learning_rate": 2e-2,
                     "physical_batch_size": batch_size},
        "privacy": {"noise_multiplier": 1.0 if private else 0, "noise_seed": 1},
        "options": {"mode": mode, **(extra or {})},
    })


def _data(cfg: Any) -> Any:
    from privaudit.mechanisms.training import prepare_data

    return prepare_data(cfg)


@pytest.mark.slow
def test_simulate_tracks_clear_training_loss() -> None:
    """120 steps of a tiny causal LM (~30 s on 2 busy cores): final losses within 5%."""
    torch.set_num_threads(1)
    steps = 120
    data = _data(_cfg("clear", steps=steps))
    runs = {m: fit(_cfg(m, steps=steps), data.train, data.heldout).metrics["he"]["train_losses"]
            for m in ("clear", "simulate")}
    clear, sim = (float(np.mean(runs[m][-20:])) for m in ("clear", "simulate"))
    first = float(np.mean(runs["clear"][:5]))
    assert clear < 0.8 * first  # it learns: the comparison is not between two flat curves
    assert abs(sim - clear) <= 0.05 * clear, (sim, clear)
    assert runs["clear"] != runs["simulate"]


def test_planned_events() -> None:
    data = _data(_cfg("execute", steps=5))
    n = len(data.train)
    ev = planned_events(_cfg("execute", steps=5), resolve_plan(_cfg("execute", steps=5), n))
    # non-private: the fail-closed marker (the adapter is released without noise), then the exchanges
    assert [type(e) for e in ev] == [PlaintextEvent, EncryptedEvent] and ev[1].count == 5
    assert ev[0].what == RELEASED_WITHOUT_NOISE
    ev = planned_events(_cfg("execute", steps=5, sampling="poisson"),
                        resolve_plan(_cfg("execute", steps=5, sampling="poisson"), n))
    assert isinstance(ev[0], PlaintextEvent)  # Poisson batch sizes reach the worker
    ev = planned_events(_cfg("simulate", steps=5, private=True),
                        resolve_plan(_cfg("simulate", steps=5, private=True), n))
    assert [type(e) for e in ev] == [GaussianEvent] and ev[0].count == 5


def test_dp_noise_on_the_owner_side(tmp_path: Path) -> None:
    cfg = _cfg("simulate", steps=3, private=True)
    data = _data(cfg)
    ledger = Ledger.create(tmp_path / "ledger.jsonl", mechanism="he_lora", observer="worker")
    result = fit(cfg, data.train, data.heldout, ledger=ledger)
    ledger.close()
    events = Ledger.read(tmp_path / "ledger.jsonl").events
    assert [type(e) for e in events] == [GaussianEvent] and events[0].count == 3
    assert "DP-SGD" in result.metrics["he"]["adapter_guarantee"]
    assert result.steps_done == 3
    assert not any(isinstance(m, RemoteLinear) for m in result.model.modules())


@pytest.mark.parametrize("private", [False, True])
def test_execute_path_plans_bytes_and_writes_events_first(tmp_path: Path, private: bool) -> None:
    """The execute code path (dry-run planning, write-ahead step events, byte checks) with the
    unencrypted backend standing in for GLWE: it must be recorded as plaintext, and the predicted
    bytes must equal the counted ones (no correction)."""
    from privaudit.mechanisms.he_lora.backend import SimulateBackend

    cfg = _cfg("execute", steps=3, private=private, max_length=8)
    data = _data(cfg)
    ledger = Ledger.create(tmp_path / "ledger.jsonl", mechanism="he_lora", observer="worker")

    class Checking(InProcessTransport):
        """Records, at each product sent, how many step events the ledger already holds."""

        def __init__(self) -> None:
            super().__init__()
            self.recorded_at_send: list[int] = []

        def exchange(self, frame: bytes) -> bytes:
            if decode_message(frame).type == MsgType.MATMUL:
                self.recorded_at_send.append(sum(e.count for e in ledger.events if isinstance(e, PlaintextEvent)))
            return super().exchange(frame)

    transport = Checking()
    result = fit(cfg, data.train, data.heldout, ledger=ledger, transport=transport, _backend=SimulateBackend())
    # write-ahead: the i-th step's products (7 each) are sent after its event is durable
    marker = 0 if private else 1  # the non-private run's RELEASED_WITHOUT_NOISE event comes first
    assert transport.recorded_at_send == [i // 7 + 1 + marker for i in range(21)]
    ledger.close()
    he = result.metrics["he"]
    assert he["byte_corrections"] == 0 and he["steps"] == 3
    assert he["exchanges"] == 3 * 7  # 4 forward + 3 backward (c_attn's input needs no gradient)
    events = Ledger.read(tmp_path / "ledger.jsonl").events
    plain = [e for e in events if isinstance(e, PlaintextEvent) and e.what != RELEASED_WITHOUT_NOISE]
    assert sum(e.count for e in plain) == 3 and all("unencrypted" in e.what for e in plain)
    assert not any(isinstance(e, EncryptedEvent) for e in events)
    if private:
        assert [type(e) for e in events] == [PlaintextEvent, GaussianEvent] * 3
    else:
        assert len(events) == 2 and events[0].what == RELEASED_WITHOUT_NOISE  # identical steps merge
    assert verify_ledger(tmp_path / "ledger.jsonl").ok


def test_adapter_without_noise_is_flagged() -> None:
    cfg = _cfg("clear", steps=1)
    data = _data(cfg)
    result = fit(cfg, data.train, data.heldout)
    assert "no DP guarantee" in result.metrics["he"]["adapter_guarantee"]


# ----------------------------------------------------------------------------------------------
# end to end: a separate worker process on loopback
# ----------------------------------------------------------------------------------------------
def _start_worker() -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen([sys.executable, "-m", "privaudit", "he-worker", "--port", "0", "--once"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if "listening on 127.0.0.1:" not in line:
        proc.kill()
        raise AssertionError(f"worker did not start: {line!r} {proc.stderr.read() if proc.stderr else ''}")
    return proc, int(line.strip().rsplit(":", 1)[1])


@needs_glwe
@pytest.mark.slow
def test_encrypted_training_through_a_worker_process(tmp_path: Path) -> None:
    proc, port = _start_worker()
    try:
        cfg = _cfg("execute", steps=2, n_embd=8, max_length=4, batch_size=1, n_people=4,
                   extra={"worker": f"127.0.0.1:{port}", "keep_transcript": True})
        data = _data(cfg)
        ledger = Ledger.create(tmp_path / "ledger.jsonl", mechanism="he_lora", observer="worker")
        start = time.time()
        result = fit(cfg, data.train, data.heldout, ledger=ledger, transcript_path=tmp_path / "sent.bin")
        ledger.close()
        elapsed = time.time() - start
        assert proc.wait(timeout=60) == 0  # --once: the worker exits after CLOSE
    finally:
        if proc.poll() is None:
            proc.kill()
    assert verify_ledger(tmp_path / "ledger.jsonl").ok
    led = Ledger.read(tmp_path / "ledger.jsonl")
    assert led.header.observer == "worker" and led.header.mechanism == "he_lora"
    events = led.events
    assert [e.what for e in events[:1]] == [RELEASED_WITHOUT_NOISE]  # fail-closed marker: no DP on the adapter
    events = events[1:]
    assert len(events) == 1 and isinstance(events[0], EncryptedEvent)  # identical steps merged
    ev = events[0]
    he = result.metrics["he"]
    assert ev.count == 2 and ev.security_bits == 128 and ev.scheme == "tfhe-glwe"
    assert ev.count * ev.bytes_to_server == he["bytes_to_worker"]
    assert ev.count * ev.bytes_from_server == he["bytes_from_worker"]
    assert he["byte_corrections"] == 0 and he["mode"] == "execute"
    assert he["setup_bytes_to_worker"] > 10_000_000  # the evaluation key, once
    # the saved transcript is exactly what was sent, and only allowed message types
    from privaudit.mechanisms.he_lora.worker import read_frames

    with open(tmp_path / "sent.bin", "rb") as fh:
        sent = read_frames(fh)
    assert {m.type for m in sent} <= OWNER_TO_WORKER
    assert sum(len(encode_message(m)) for m in sent) == he["setup_bytes_to_worker"] + he["bytes_to_worker"]
    print(json.dumps({"seconds": elapsed, "bytes_to": he["bytes_to_worker"], "steps": ev.count}))


def test_example_config_parses() -> None:
    from privaudit.config import load_config

    cfg = load_config(REPO / "examples" / "he_lora.yaml")
    assert cfg.mechanism == "he_lora"
    settings = HESettings.from_options(cfg.options)
    assert settings.mode == "simulate" and settings.pad_to_max_length
    assert cfg.training.sampling == "fixed_batch"  # shapes hidden from the worker


def test_cli_he_worker_rejects_bad_port() -> None:
    proc = subprocess.run([sys.executable, "-m", "privaudit", "he-worker", "--port", "70000"],
                          capture_output=True, text=True, cwd=REPO, timeout=60)
    assert proc.returncode == 2 and "port" in proc.stderr


# ----------------------------------------------------------------------------------------------
# owner-side randomness: the CSPRNG unless seeded
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("private", [False, True])
def test_default_run_samples_and_noises_from_the_csprng(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        private: bool) -> None:
    from privaudit.config import config_to_dict
    from privaudit.runs import train
    from tests.mechanisms.rng_spy import spy_generators

    d = config_to_dict(_cfg("simulate", steps=2, private=private, max_length=8))
    d["privacy"]["noise_seed"] = None
    cfg = parse_config(d)
    seen = spy_generators(monkeypatch)
    rd = train(cfg, tmp_path / "run", progress=False).run_dir
    assert Ledger.read(rd / "ledger.jsonl").header.noise_secure is True
    # the sampler (both runs) and one noise draw per step (private): never torch's or numpy's PRNG
    assert len(seen) >= (3 if private else 1) and set(seen) == {"SecureGenerator"}


def test_seeded_run_is_reproducible_and_said_not_secure(tmp_path: Path) -> None:
    from privaudit.runs import train

    cfg = _cfg("simulate", steps=2, private=True, max_length=8)  # noise_seed 1
    runs = [train(cfg, tmp_path / f"run{i}", progress=False).run_dir for i in range(2)]
    assert Ledger.read(runs[0] / "ledger.jsonl").header.noise_secure is False
    from safetensors.torch import load_file

    a, b = (load_file(str(rd / "adapter.safetensors")) for rd in runs)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
