"""Device discipline (issue 12): every kernel launch on the tensors' device, graph capture and
replay on the engine's device, the native CUDA module against the shared CUDA runtime.

Triton launches on ``torch.cuda.current_device()``: an engine on ``cuda:1`` must not run its
kernels on GPU 0. On the CPU the CUDA device state is simulated (``torch.cuda.current_device`` /
``torch.cuda.device`` replaced by a fake that records switches) and the kernels are replaced by
recorders that note the device current when they are launched: a launch path that skips the
guard launches on device 0 and fails here. The GPU tests (two devices) compare real tokens.
"""

from __future__ import annotations

import ast
import contextlib
import importlib.util
import inspect
import re
from pathlib import Path

import pytest
import torch

import ursa_engine as ue
from ursa_engine import _cudart, _dispatch, _native, graphs, model_ops, ops_library

ROOT = Path(__file__).resolve().parents[1]
CUDA1 = torch.device("cuda", 1)


class FakeCuda:
    """The current CUDA device as a number; ``torch.cuda.device`` contexts switch it."""

    def __init__(self):
        self.current = 0
        self.switches: list[int] = []

    def current_device(self) -> int:
        return self.current

    @contextlib.contextmanager
    def device(self, index):
        index = index.index if isinstance(index, torch.device) else int(index)
        previous, self.current = self.current, index
        self.switches.append(index)
        try:
            yield
        finally:
            self.current = previous


@pytest.fixture
def cuda(monkeypatch):
    fake = FakeCuda()
    monkeypatch.setattr(torch.cuda, "current_device", fake.current_device)
    monkeypatch.setattr(torch.cuda, "device", fake.device)
    return fake


class OnCuda1:
    """Stands for a tensor on cuda:1 (the launch recorders never read it)."""

    device = CUDA1
    is_cuda = True


class Recorder:
    """Replaces the kernel modules: every launcher notes (module, function, current device)."""

    def __init__(self, cuda: FakeCuda):
        self.cuda, self.calls = cuda, []

    def module(self, name: str):
        rec = self

        class Module:
            def __getattr__(self, fn):
                def launch(*args, **kwargs):
                    rec.calls.append((name, fn, rec.cuda.current))
                    if kwargs.get("out") is not None:
                        return kwargs["out"]
                    new = [a.clone() if isinstance(a, torch.Tensor) else a for a in args[:2]]  # fresh outputs
                    return tuple(new) if fn == "qk_norm_rope" or kwargs.get("residual") is not None else new[0]

                return launch

        return Module()


@pytest.fixture
def recorder(cuda, monkeypatch):
    rec = Recorder(cuda)
    monkeypatch.setattr(ops_library, "_fn", lambda backend, op: getattr(rec.module(backend), op))
    monkeypatch.setattr(ops_library, "_triton", rec.module)
    return rec


# ----------------------------------------------------------------------------- the guard
def test_on_device_switches_only_to_another_cuda_device_and_back(cuda, monkeypatch):
    with ops_library.on_device(None, 3, OnCuda1(), torch.zeros(1)):  # the first CUDA tensor decides
        assert cuda.current == 1
    assert cuda.current == 0 and cuda.switches == [1]
    cuda.current = 1
    with ops_library.on_device(OnCuda1()):  # already current: nothing switched
        assert cuda.current == 1
    with ops_library.on_device(torch.device("cuda")):  # no index: the current device
        assert cuda.current == 1
    assert cuda.switches == [1]


def test_on_device_touches_no_cuda_state_for_cpu_and_meta_tensors(monkeypatch):
    def forbidden(*a, **k):
        raise AssertionError("CUDA state read for tensors that are not on a CUDA device")

    monkeypatch.setattr(torch.cuda, "current_device", forbidden)
    monkeypatch.setattr(torch.cuda, "device", forbidden)
    with ops_library.on_device(torch.zeros(2), torch.empty(2, device="meta"), None, [1, 2], torch.device("cpu")):
        pass


def _dummy(name: str, annotation: str):
    """An argument for a custom op body: a cuda:1 stand-in for tensors, plain values otherwise."""
    if "Tensor" in annotation:
        return OnCuda1()
    if name == "backend":
        return "triton"
    if name == "op":
        return "mixture_sample"
    return {"int": 4, "float": 1.0, "bool": False, "str": "x"}.get(annotation)


def test_every_custom_op_body_launches_on_its_tensors_device(recorder):
    """Each registered launcher (sampler ops, model ops, head draw) runs its kernel with the
    tensors' device current, and restores the caller's device."""
    assert set(ops_library.LAUNCHERS) >= {"metric_step", "mixture_step", "mask_step", "metric_sample",
                                           "uniform_sample", "rms_norm", "add_rms_norm", "qk_norm_rope", "swiglu",
                                           "head_draw"}
    for name, body in ops_library.LAUNCHERS.items():
        params = inspect.signature(body).parameters.values()
        recorder.calls.clear()
        body(*[_dummy(p.name, str(p.annotation)) for p in params])
        assert recorder.calls and all(dev == 1 for _, _, dev in recorder.calls), (name, recorder.calls)
        assert recorder.cuda.current == 0


def _as_if_on_cuda1(monkeypatch):
    """Real CPU tensors through the real dispatch path, the guard told they live on cuda:1."""
    real = ops_library._cuda_index
    monkeypatch.setattr(ops_library, "_cuda_index",
                        lambda obj: 1 if isinstance(obj, torch.Tensor) and obj.device.type == "cpu" else real(obj))


def _sampler_calls():
    D, K = 4, 8
    z, x, x1 = torch.zeros(D, K), torch.zeros(D, dtype=torch.int64), torch.zeros(D, dtype=torch.int64)
    table, params, step = torch.zeros(K, 3), torch.zeros(4), torch.zeros(1, dtype=torch.int64)
    rng = dict(seeds=torch.zeros(1, dtype=torch.int64), row_len=D)
    return {
        "metric_step": ((z, None, x, table, params, step), rng),
        "mixture_step": ((z, None, x, params, step), rng),
        "mask_step": ((z, None, x, params, step), {**rng, "mask_id": K - 1}),
        "metric_sample": ((x1, torch.ones(D), table), rng),
        "mixture_sample": ((x1, torch.ones(D)), {**rng, "K": K}),
        "mask_sample": ((x1, torch.ones(D)), {**rng, "mask_id": K - 1}),
    }


@pytest.mark.parametrize("backend", ["triton", "native"])
def test_sampler_ops_handed_out_by_resolve_launch_on_the_tensors_device(recorder, monkeypatch, backend):
    """resolve -> sampler_op -> torch.ops.ursa.* -> guarded body -> kernel, for every sampler op."""
    _as_if_on_cuda1(monkeypatch)
    monkeypatch.setattr(_dispatch, "why_not", lambda *a, **k: None)
    calls = _sampler_calls()
    assert set(calls) == set(_dispatch.OPS)
    for op, (args, kw) in calls.items():
        recorder.calls.clear()
        _dispatch.resolve(op, backend, torch.device("cpu"))(*args, **kw)
        assert [(m, d) for m, _, d in recorder.calls] == [(backend, 1)], (op, recorder.calls)
    assert recorder.cuda.current == 0


def test_model_ops_and_the_fused_head_launch_on_the_tensors_device(recorder, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # lets backend="triton" resolve on the CPU
    pytest.importorskip("triton")
    _as_if_on_cuda1(monkeypatch)
    x, w = torch.zeros(2, 3, 8), torch.ones(8)
    q, k, cos = torch.zeros(1, 3, 2, 4), torch.zeros(1, 3, 1, 4), torch.zeros(3, 4)
    model_ops.rms_norm(x, w, 1e-6, backend="triton")
    model_ops.rms_norm(x, w, 1e-6, residual=x, backend="triton")
    model_ops.qk_norm_rope(q, k, torch.ones(4), torch.ones(4), cos, cos, 1e-6, backend="triton")
    model_ops.swiglu(x, x, backend="triton")
    ops_library.head_draw(torch.zeros(3, 8), torch.zeros(5, 8), seeds=torch.zeros(1, dtype=torch.int64), row_len=3,
                          step=torch.zeros(1, dtype=torch.int64))
    assert [(fn, d) for _, fn, d in recorder.calls] == [("rms_norm", 1), ("rms_norm", 1), ("qk_norm_rope", 1),
                                                        ("swiglu", 1), ("head_draw", 1)]


def test_every_custom_op_is_guarded_and_nothing_else_launches_kernels():
    """Static: each ``@custom_op`` body of ops_library is decorated ``@launches`` with its name,
    and no other module of the package names a kernel module (so cannot launch around the guard);
    the fused sampler ops ``resolve`` hands out are ops_library's."""
    tree = ast.parse((ROOT / "ursa_engine" / "ops_library.py").read_text())
    ops = {}
    for fn in (n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)):
        decos = {ast.unparse(d.func): d.args[0].value for d in fn.decorator_list
                 if isinstance(d, ast.Call) and d.args and isinstance(d.args[0], ast.Constant)}
        if "custom_op" in decos:
            assert decos.get("launches") == decos["custom_op"].removeprefix("ursa::"), fn.name
            ops[fn.name] = decos["launches"]
    assert len(ops) >= 10 and set(ops.values()) == set(ops_library.LAUNCHERS)
    kernel_module = re.compile(r"ursa_engine\.(triton_kernels(\.\w+)*\.?|_native_cuda|_native)")
    allowed = {"ops_library.py": "launches under the guard", "_dispatch.py": "availability only (why_not)",
               "_native.py": "the native wrapper itself (guards its own calls)"}
    for path in sorted((ROOT / "ursa_engine").rglob("*.py")):
        docstrings = {id(n.body[0].value) for n in ast.walk(ast.parse(path.read_text()))
                      if isinstance(n, (ast.Module, ast.FunctionDef, ast.ClassDef)) and n.body
                      and isinstance(n.body[0], ast.Expr)}
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom):  # relative imports read from the package (approximately)
                base = node.module or "" if not node.level else ".".join(["ursa_engine", node.module or ""]).rstrip(".")
                names = [base] + [f"{base}.{a.name}" for a in node.names]
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
                names.append(node.value)
            hits = [n for n in names if kernel_module.fullmatch(n)]
            assert not hits or path.name in allowed, f"{path.relative_to(ROOT)} names kernel module {hits}"
    for backend in ("triton", "native"):
        for op in _dispatch.OPS:
            assert _dispatch._op(backend, op) is ops_library.sampler_op(op, backend)


def test_generate_runs_on_the_engines_device():
    """Engine.generate is wrapped: its CUDA events, tuning and graph captures land on its device."""
    assert getattr(ue.Engine.generate, "__ursa_on_own_device__", False)


def test_on_own_device_makes_the_objects_device_current(cuda):
    class OnGpu1:
        device = CUDA1

        @ops_library.on_own_device
        def run(self):
            return cuda.current

    assert OnGpu1().run() == 1 and cuda.current == 0


# ----------------------------------------------------------------------------- graphs
class FakeStream:
    def __init__(self, device=None):
        self.device = torch.device(device) if device is not None else None

    def wait_stream(self, other):
        pass


def test_graph_capture_streams_and_warm_up_are_on_the_given_device(cuda, monkeypatch):
    seen = {}

    @contextlib.contextmanager
    def fake_graph(g, pool=None, stream=None):
        seen["capture_stream"], seen["capture_current"] = stream.device, cuda.current
        yield

    class FakeGraph:
        def replay(self):
            seen["replayed"] = True

    monkeypatch.setattr(torch.cuda, "Stream", FakeStream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: FakeStream(device))
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "graph", fake_graph)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", FakeGraph)
    runs = []
    replay = graphs.cuda_graph_capture(lambda: runs.append(cuda.current), pool=None, device="cuda:1")
    assert runs == [1, 1, 1] and seen == {"capture_stream": CUDA1, "capture_current": 1}
    assert cuda.current == 0
    replay()
    assert seen["replayed"]
    graphs.cuda_graph_capture(lambda: runs.append(cuda.current), pool=None)  # default: the current device
    assert runs[3:] == [0, 0, 0] and seen["capture_stream"] == torch.device("cuda", 0)


def test_graph_runner_captures_and_replays_on_the_engines_device(cuda, monkeypatch):
    events = []

    def fake_capture(fn, pool):
        events.append(("capture", cuda.current))
        fn()
        return lambda: events.append(("replay", cuda.current))

    class State:
        ids, x = torch.zeros(2, 3, dtype=torch.int64), torch.zeros(1, 3, dtype=torch.int64)

        def body(self, k, rows):
            events.append(("body", cuda.current))

    monkeypatch.setattr(graphs, "cuda_graph_capture", fake_capture)
    runner = object.__new__(graphs.GraphRunner)  # its __init__ allocates on the device
    runner.state, runner.device, runner.k, runner.pool, runner.graphs = State(), CUDA1, torch.zeros(()), None, {}
    runner.replay(0, 2)
    runner.replay(1, 2)
    assert events == [("capture", 1), ("body", 1), ("replay", 1), ("replay", 1)] and cuda.current == 0


# ----------------------------------------------------------------------------- native CUDA runtime
def _cuda_module_file() -> Path | None:
    spec = importlib.util.find_spec("ursa_engine._native_cuda")
    return Path(spec.origin) if spec is not None and spec.origin else None


def test_native_cuda_module_links_the_shared_cuda_runtime():
    """The built module needs ``libcudart.so.<major>`` (resolved like torch's) and carries no
    static runtime (whose ``cudart.shm`` / ``libcuda.so.1`` strings the static archive embeds).
    Skipped where the CUDA module was not built; an old static build fails: rebuild (`make`)."""
    path = _cuda_module_file()
    if path is None:
        pytest.skip(f"the CUDA module was not built ({_native.build_info()['cuda_note']})")
    needed = _cudart.elf_needed(path)
    assert any(_cudart.CUDART.fullmatch(n) for n in needed), (
        f"{path.name} needs {needed}: no shared libcudart, a static CUDA runtime build; rebuild it (pip install -e .)")
    data = path.read_bytes()
    assert b"cudart.shm" not in data and b"libcuda.so.1" not in data


def test_elf_needed_reads_the_dynamic_section_of_the_cpu_module():
    path = Path(importlib.util.find_spec("ursa_engine._native_cpu").origin)
    needed = _cudart.elf_needed(path)
    assert any(n.startswith("libc.so") for n in needed) and not any("cudart" in n for n in needed)
    with pytest.raises(ValueError, match="not an ELF64"):
        _cudart.elf_needed(Path(__file__))


def test_a_missing_cuda_runtime_is_preloaded_from_the_wheel_layout(tmp_path, monkeypatch):
    """``libcudart.so.13: cannot open`` -> the copy under ``<site>/nvidia/cu13/lib`` is loaded and
    the import retried; none found -> the reason names the runtime, torch's CUDA and the fixes."""
    toolkit = next((d / "libcudart.so.13" for d in (Path("/usr/local/cuda/lib64"), Path("/usr/local/cuda/lib"))
                    if (d / "libcudart.so.13").is_file()), None)
    attempts = []

    def fake_import(name):
        attempts.append(name)
        if len(attempts) == 1:
            raise ImportError("libcudart.so.13: cannot open shared object file: No such file or directory")
        return "module"

    monkeypatch.setattr(_cudart.importlib, "import_module", fake_import)
    monkeypatch.setenv("CUDA_HOME", str(tmp_path / "none"))
    monkeypatch.setenv("CUDA_PATH", str(tmp_path / "none"))
    monkeypatch.setattr(_cudart, "cudart_dirs", lambda major: [tmp_path / "site" / "nvidia" / f"cu{major}" / "lib"])
    mod, why = _cudart.import_module("x._native_cuda")
    assert mod is None and "libcudart.so.13" in why and "nvidia-cuda-runtime" in why and "CUDACXX" in why
    if toolkit is None:
        pytest.skip("no CUDA 13 runtime on this machine to preload")
    lib = tmp_path / "site" / "nvidia" / "cu13" / "lib"
    lib.mkdir(parents=True)
    (lib / "libcudart.so.13").symlink_to(toolkit)
    attempts.clear()
    assert _cudart.import_module("x._native_cuda") == ("module", None) and len(attempts) == 2


def test_no_device_reasons_say_what_to_do():
    base = dict(cudart="libcudart.so.13", runtime=13000, torch_devices=1, status="no error")
    old = _cudart.no_device_reason({**base, "driver": 12080, "status": "CUDA driver version is insufficient"})
    assert "supports CUDA 12.8" in old and "CUDA 13.0" in old and "install a driver for CUDA 13" in old
    assert "CUDACXX" in old
    assert "no NVIDIA driver" in _cudart.no_device_reason({**base, "driver": 0})
    assert "static CUDA runtime" in _cudart.no_device_reason({**base, "cudart": None})


def test_the_loaded_cuda_module_explains_why_it_sees_no_device():
    """Where the module loads but no GPU is visible (CI), ``unavailable`` says why, not just that."""
    if _cuda_module_file() is None or torch.cuda.is_available():
        pytest.skip("needs the built CUDA module and no GPU")
    report = _native.cuda_report()
    reason = _native.unavailable("cuda")
    if not report["loaded"]:
        assert reason.startswith("native CUDA module cannot load") and report["error"] in reason
        return
    assert report["devices"] == 0 and "sees no CUDA device" in reason
    if report["cudart"] is not None:  # the shared runtime: its own versions and message
        assert report["runtime"] >= 12000 and "driver" in reason


# ----------------------------------------------------------------------------- GPU (two devices)
two_gpus = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                              reason="needs two CUDA devices")


@pytest.mark.gpu
@two_gpus
def test_engine_on_the_second_gpu_gives_the_tokens_of_the_first():
    """The bring-up suite's check: cuda:0 current, the engine on cuda:1, eager and graph mode, each
    fused sampler backend: the tokens of the same engine on cuda:0."""
    from ursa_engine.benchmarks.gpu_suite import device_check

    result = device_check(steps=4)
    assert result["status"] == "ok" and result["runs"], result
    assert all(r["equal"] for r in result["runs"]), result["runs"]


@pytest.mark.gpu
@two_gpus
def test_fused_ops_on_the_second_gpu_equal_the_first_while_gpu0_is_current():
    torch.cuda.set_device(0)
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(64, 256, generator=g), torch.randn(256, generator=g)
    D, K = 512, 64
    z = torch.randn(D, K, generator=g)
    outs = {}
    for dev in ("cuda:0", "cuda:1"):
        norm = model_ops.rms_norm(x.to(dev), w.to(dev), 1e-6, backend="triton")
        ref = model_ops.rms_norm(x.to(dev), w.to(dev), 1e-6, backend="torch")
        torch.testing.assert_close(norm, ref, rtol=1e-4, atol=1e-4)
        cb = ue.Codebook.fsq((4, 4, 4))
        step = _dispatch.resolve("metric_step", "triton", torch.device(dev))
        outs[dev] = step(z.to(dev), None, torch.zeros(D, dtype=torch.int64, device=dev), cb.normalized_on(dev),
                         torch.tensor([0.3, 0.1, 2.0, 0.5], device=dev), torch.tensor([1], device=dev),
                         seeds=torch.tensor([3], device=dev), row_len=D, levels=cb.levels).cpu()
        assert torch.cuda.current_device() == 0
    assert torch.equal(outs["cuda:0"], outs["cuda:1"])
