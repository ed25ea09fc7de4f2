"""The cpp backend specifically: the extension is loaded and its kernels ran, the raw ops check their
arguments, and a machine that cannot build the extension gets the reason instead of a crash (what every
fused backend must do besides, its threaded path included, is in test_fused.py)."""
import importlib
import sys

import pytest
import torch

import fastrnn
from fastrnn import dispatch
from conftest import CPU_BACKENDS, backends_used, trained_outputs

if "cpp" not in CPU_BACKENDS:
    pytest.skip(f"cpp backend unavailable here: {dispatch.reasons('cpp')}", allow_module_level=True)
from fastrnn.backends import cpp  # noqa: E402


def test_extension_loaded_and_ran(ran):
    assert cpp._C is not None and not dispatch.reasons("cpp")
    assert cpp.BACKEND.isa() in ("avx512 (x86-64-v4)", "avx2 (x86-64-v3)", "baseline x86-64")
    assert dispatch.available_backends("cpu")[0] == "cpp"  # the automatic choice on CPU
    torch.manual_seed(0)
    for cls, tcls in ((fastrnn.LSTM, torch.nn.LSTM), (fastrnn.GRU, torch.nn.GRU), (fastrnn.RNN, torch.nn.RNN)):
        ref = tcls(4, 6)
        mod = cls(4, 6)  # automatic choice
        mod.load_state_dict(ref.state_dict())
        x = torch.randn(3, 2, 4, requires_grad=True)
        y = mod(x)[0]
        (gx,) = torch.autograd.grad(y.sum(), x)
        y_ref = ref(x)[0]
        (gx_ref,) = torch.autograd.grad(y_ref.sum(), x)
        torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(gx, gx_ref, atol=1e-4, rtol=1e-4)
    assert backends_used(ran) == {"cpp"}
    assert {op for op, _ in ran} >= {f"{f}_seq_{p}" for f in ("lstm", "gru", "rnn") for p in ("fwd", "bwd")}


def test_raw_ops_check_their_arguments():
    op = torch.ops.fastrnn_cpp
    xw, w, h = torch.randn(3, 2, 12), torch.randn(12, 4), torch.zeros(2, 4)
    no = (None, None, None)  # no cell options (ln_h, rmask, zmask)
    with pytest.raises(RuntimeError, match=r"w_hh must have shape \[12, 4\], got \[12, 5\]"):
        op.gru_seq_fwd(xw, torch.randn(12, 5), None, *no, h, None, False, 0.0, False)
    with pytest.raises(RuntimeError, match="xw has dtype Double but the input has Float|h0 has dtype Double"):
        op.gru_seq_fwd(xw, w, None, *no, h.double(), None, False, 0.0, False)
    with pytest.raises(RuntimeError, match=r"lengths\[1\] = 4 is not in 1..3"):
        op.gru_seq_fwd(xw, w, None, *no, h, torch.tensor([3, 4]), False, 0.0, False)
    with pytest.raises(RuntimeError, match="lengths must be non-increasing"):
        op.gru_seq_fwd(xw, w, None, *no, h, torch.tensor([1, 3]), False, 0.0, False)
    with pytest.raises(RuntimeError, match="unknown nonlinearity 'gelu'"):
        op.rnn_seq_fwd(torch.randn(3, 2, 4), torch.randn(4, 4), None, h, None, False, "gelu", False)
    with pytest.raises(RuntimeError, match="must be contiguous"):
        op.gru_seq_fwd(xw, torch.randn(4, 12).t(), None, *no, h, None, False, 0.0, False)
    with pytest.raises(RuntimeError, match=r"rmask must have shape \[2, 4\], got \[2, 5\]"):
        op.gru_seq_fwd(xw, w, None, None, torch.ones(2, 5), None, h, None, False, 0.0, False)
    with pytest.raises(RuntimeError, match=r"zmask_c must have shape \[3, 2, 4\], got \[2, 4\]"):
        op.lstm_seq_fwd(torch.randn(3, 2, 16), torch.randn(16, 4), None, None, None, None, None, None, None, None,
                        torch.ones(2, 4), h, h, None, False, False, 0.0, 0.0, False)
    # a packed sequence's rows (xw [N, G*H]) take lengths that sum to N, and no zoneout mask
    with pytest.raises(RuntimeError, match=r"xw must be \[T, B, 3\*H\] \(or with lengths a packed"):
        op.gru_seq_fwd(xw[0], w, None, *no, h, None, False, 0.0, False)
    with pytest.raises(RuntimeError, match="xw has 2 rows but the lengths sum to 4"):
        op.gru_seq_fwd(xw[0], w, None, *no, h, torch.tensor([2, 2]), False, 0.0, False)
    with pytest.raises(RuntimeError, match="a zoneout mask .* not a packed sequence's rows"):
        op.gru_seq_fwd(xw[:2].reshape(4, 12), w, None, None, None, torch.ones(2, 2, 4), h, torch.tensor([2, 2]),
                       False, 0.0, False)
    # the inference cells (input projection inside): x [B, I], w_ih [G*H, I]
    x, w_ih = torch.randn(2, 5), torch.randn(12, 5)
    with pytest.raises(RuntimeError, match=r"w_ih must have shape \[12, 5\], got \[12, 6\]"):
        op.gru_cell_fwd(x, torch.randn(12, 6), None, w, None, h)
    with pytest.raises(RuntimeError, match=r"x must be \[B, I\], got \[2, 1, 5\]"):
        op.gru_cell_fwd(x.unsqueeze(1), w_ih, None, w, None, h)
    with pytest.raises(RuntimeError, match=r"b_ih must have shape \[16\], got \[12\]"):
        op.lstm_cell_fwd(x, torch.randn(16, 5), torch.randn(12), torch.randn(16, 4), None, None, None, h, h, False)
    with pytest.raises(RuntimeError, match="h0 must have shape \\[2, 4\\], got \\[3, 4\\]"):
        op.rnn_cell_fwd(x, torch.randn(4, 5), None, torch.randn(4, 4), None, torch.zeros(3, 4), "tanh")


def _fused_args(family, entry, T, B, I, H, dtype, bias=True):
    """Random arguments of the cpp backend's ``<family>_<entry>_fwd`` (entry 'cell' or 'chunk')."""
    G = {"lstm": 4, "gru": 3, "rnn": 1}[family]
    r = lambda *s: torch.randn(*s, dtype=dtype)  # noqa: E731
    lead = (T, B) if entry == "chunk" else (B,)
    args = [r(*lead, I), r(G * H, I), r(G * H) if bias else None, r(G * H, H), r(G * H) if bias else None]
    if family == "lstm":
        args += [None, None, r(B, H), r(B, H)]
    else:
        args += [r(B, H)]
    if entry == "chunk":
        args.append(False)
    return args + {"lstm": [False], "gru": [], "rnn": ["tanh"]}[family]


@pytest.mark.parametrize("threads", ["one", "team"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("family", ["lstm", "gru", "rnn"])
def test_direct_inference_entries_equal_the_ops(family, dtype, threads):
    """The fast paths call the inference entries through the extension's direct bindings (no dispatcher):
    the backend hands those out, and they give the registered ops' results bit for bit, over shapes that
    take the per-thread scratch stack, its overflow to malloc (a first call larger than the stack) and
    the pool (a panel of 1 MiB and more), with and without biases; bad arguments raise the ops'
    RuntimeError."""
    for entry in ("cell", "chunk"):
        assert getattr(cpp.BACKEND, f"{family}_{entry}_fwd") is getattr(cpp._C, f"{family}_{entry}_fwd")
    old = cpp.BACKEND.set_parallel_min_macs(0) if threads == "team" else None
    try:
        torch.manual_seed(0)
        for entry, T, B, I, H, bias in (("cell", 1, 1, 8, 5, True), ("cell", 1, 3, 21, 40, False),
                                        ("chunk", 4, 2, 300, 260, True), ("chunk", 3, 1, 7, 17, False),
                                        ("cell", 1, 2, 6, 33, True)):
            args = _fused_args(family, entry, T, B, I, H, dtype, bias)
            name = f"{family}_{entry}_fwd"
            want = getattr(torch.ops.fastrnn_cpp, name)(*args)
            got = getattr(cpp._C, name)(*args)
            want, got = (want, got) if isinstance(want, tuple) else ((want,), (got,))
            assert len(got) == len(want)
            for g, w in zip(got, want):
                assert g.dtype == dtype and torch.equal(g, w), (name, T, B, I, H)
        bad = _fused_args(family, "cell", 1, 2, 5, 4, dtype)
        bad[1] = torch.randn(bad[1].shape[0], 6, dtype=dtype)
        with pytest.raises(RuntimeError, match=r"w_ih must have shape"):
            getattr(cpp._C, f"{family}_cell_fwd")(*bad)
    finally:
        if old is not None:
            cpp.BACKEND.set_parallel_min_macs(old)


@pytest.mark.parametrize("threads", ["one", "team"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_unpacked_products_over_every_tail_of_k(dtype, threads):
    """A cell's products run unpacked (the dot form: a block of a vector's lanes of W's rows, two vectors of
    k a pass, then one, then single k): sizes around one and two vectors (16 / 32 floats, 8 / 16 doubles),
    a batch of one and of three, and hidden sizes that leave a partial block of rows, against torch's
    cell in float64."""
    old = cpp.BACKEND.set_parallel_min_macs(0) if threads == "team" else None
    try:
        torch.manual_seed(0)
        for I in (5, 8, 15, 16, 17, 24, 31, 32, 33, 40, 47, 48, 50, 100):
            for B, H in ((1, 19), (3, 33), (1, 48)):
                x, h = torch.randn(B, I, dtype=torch.float64), torch.randn(B, H, dtype=torch.float64)
                w_ih, w_hh = torch.randn(H, I, dtype=torch.float64), torch.randn(H, H, dtype=torch.float64)
                b_ih, b_hh = torch.randn(H, dtype=torch.float64), torch.randn(H, dtype=torch.float64)
                want = torch.rnn_tanh_cell(x, h, w_ih, w_hh, b_ih, b_hh)
                got = torch.ops.fastrnn_cpp.rnn_cell_fwd(*(t.to(dtype) for t in (x, w_ih, b_ih, w_hh, b_hh, h)),
                                                         "tanh")
                tol = 1e-12 if dtype == torch.float64 else 2e-5
                torch.testing.assert_close(got.double(), want, atol=tol, rtol=tol, msg=f"I={I} B={B} H={H}")
    finally:
        if old is not None:
            cpp.BACKEND.set_parallel_min_macs(old)


def test_inference_entries_refuse_an_empty_input():
    """The raw inference entries refuse an input size of 0 (the modules refuse input_size=0 as torch.nn
    does; an empty x has no data pointer, which the kernels would take for 'no input projection')."""
    H = 20
    for fn in (torch.ops.fastrnn_cpp.gru_chunk_fwd, cpp._C.gru_chunk_fwd):
        with pytest.raises(RuntimeError, match="at least one input feature"):
            fn(torch.empty(12, 2, 0), torch.empty(3 * H, 0), None, torch.randn(3 * H, H), None, torch.zeros(2, H), False)
    for fn in (torch.ops.fastrnn_cpp.gru_cell_fwd, cpp._C.gru_cell_fwd):
        with pytest.raises(RuntimeError, match="at least one input feature"):
            fn(torch.empty(2, 0), torch.empty(3 * H, 0), None, torch.randn(3 * H, H), None, torch.zeros(2, H))


def test_no_compiler_means_unavailable_with_the_reason(monkeypatch):
    """Without a prebuilt extension and with a failing build, the backend reports why; fastrnn works."""
    from torch.utils import cpp_extension

    def fail(*a, **k):
        raise RuntimeError("Error building extension 'fastrnn_C': c++: command not found")

    monkeypatch.setitem(sys.modules, "fastrnn._C", None)  # makes `from .. import _C` raise ImportError
    monkeypatch.delattr(fastrnn, "_C")
    monkeypatch.setattr(cpp_extension, "load", fail)
    try:
        mod = importlib.reload(cpp)
        why = mod.BACKEND.unavailable_reasons()
        assert len(why) == 1 and "building it failed" in why[0] and "command not found" in why[0]
    finally:
        monkeypatch.undo()
        importlib.reload(cpp)
    assert not cpp.BACKEND.unavailable_reasons()


# ---- the large-buffer cache (csrc/pool.cpp) ------------------------------------------------------
# Buffers of 1 MiB and more (outputs, workspaces, the inference input projection) come from a cache of
# blocks whose pages stay mapped. Shapes here are chosen so that xw, y, ws and the backward's buffers
# cross that size for every family (T=40 B=64 H=128: y 1.3 MiB, RNN xw 1.3 MiB, LSTM xw 5.2 MiB).
BIG = dict(T=40, B=64, I=24, H=128)


def _big_pair(cls, tcls, **kw):
    torch.manual_seed(3)
    ref = tcls(BIG["I"], BIG["H"], **kw)
    mod = cls(BIG["I"], BIG["H"], backend="cpp", **kw)
    mod.load_state_dict(ref.state_dict())
    return mod, ref


@pytest.mark.parametrize("layers,bidirectional", [(1, False), (2, True)], ids=["L1", "L2bi"])
@pytest.mark.parametrize("cls,tcls", [(fastrnn.LSTM, torch.nn.LSTM), (fastrnn.GRU, torch.nn.GRU),
                                      (fastrnn.RNN, torch.nn.RNN)], ids=["LSTM", "GRU", "RNN"])
def test_cached_buffers_give_torch_values_and_are_not_reused_while_alive(cls, tcls, layers, bidirectional, ran):
    mod, ref = _big_pair(cls, tcls, num_layers=layers, bidirectional=bidirectional)
    xs = [torch.randn(BIG["T"], BIG["B"], BIG["I"]) for _ in range(3)]
    in_use0 = cpp.BACKEND.cache_info()["in_use"]
    with torch.no_grad():
        outs = [mod(x) for x in xs]  # all three outputs alive at once
        if layers == 1 and not bidirectional:  # y is the op's output itself: a cached block
            assert cpp.BACKEND.cache_info()["in_use"] >= in_use0 + 3 * outs[0][0].numel() * 4
        for x, (y, st) in zip(xs, outs):
            y_ref, st_ref = ref(x)
            torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
            for a, b in zip(st if isinstance(st, tuple) else (st,), st_ref if isinstance(st_ref, tuple) else (st_ref,)):
                torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    # training: the forward's workspace and the backward's buffers come from the cache too
    for x in xs[:2]:
        xg, xr = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        y, _ = mod(xg)
        y_ref, _ = ref(xr)
        g = torch.randn_like(y)
        grads = torch.autograd.grad(y, [xg, *mod.parameters()], g)
        grads_ref = torch.autograd.grad(y_ref, [xr, *ref.parameters()], g)
        for a, b in zip(grads, grads_ref):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert backends_used(ran) == {"cpp"}


@pytest.mark.parametrize("cls", [fastrnn.LSTM, fastrnn.GRU, fastrnn.RNN], ids=["LSTM", "GRU", "RNN"])
def test_training_projection_is_cached(cls, monkeypatch):
    """In training the input projection (functional._Projection) is held for the backward in a cached
    block: the cache holds xw's bytes more than with the backend's empty() taken away."""
    mod, _ = _big_pair(cls, {fastrnn.LSTM: torch.nn.LSTM, fastrnn.GRU: torch.nn.GRU, fastrnn.RNN: torch.nn.RNN}[cls])
    x = torch.randn(BIG["T"], BIG["B"], BIG["I"], requires_grad=True)
    G = {fastrnn.LSTM: 4, fastrnn.GRU: 3, fastrnn.RNN: 1}[cls]

    def held():
        before = cpp.BACKEND.cache_info()["in_use"]
        y, _ = mod(x)
        return cpp.BACKEND.cache_info()["in_use"] - before, y

    with_cache, y1 = held()
    monkeypatch.setattr(type(dispatch.get("cpp")), "empty", None)  # functional then uses F.linear
    without, y2 = held()
    assert with_cache - without >= BIG["T"] * BIG["B"] * G * BIG["H"] * 4
    torch.testing.assert_close(y1, y2, atol=0, rtol=0)


@pytest.mark.parametrize("backend", ["cpp", "numba"])
def test_training_projection_binds_no_signature(backend, monkeypatch, ran):
    """The training projection's node (functional._ProjectionEager, outside torch.func transforms: the backends
    with ``empty`` put the projection there) sets its context in its forward: Function.apply then binds no
    arguments through inspect.signature (~14 us a layer-direction, benchmarks/NOTES.md), and the gradients are
    torch.nn's."""
    import inspect
    if backend not in CPU_BACKENDS or getattr(dispatch.get(backend), "empty", None) is None:
        pytest.skip(f"{backend} has no `empty` here (numba: only on AMD CPUs with oneDNN): no projection node")
    from fastrnn import functional
    torch.manual_seed(3)
    ref = torch.nn.GRU(BIG["I"], BIG["H"])
    mod = fastrnn.GRU(BIG["I"], BIG["H"], backend=backend)
    mod.load_state_dict(ref.state_dict())
    x = torch.randn(BIG["T"], BIG["B"], BIG["I"], requires_grad=True)
    mod(x)[0].sum().backward()  # compiled first (numba's compiler reads signatures of its own)
    bound, nodes = [], []
    real = inspect.signature
    monkeypatch.setattr(inspect, "signature", lambda *a, **k: bound.append(a) or real(*a, **k))
    y, _ = mod(x)
    node = y.grad_fn
    while node is not None and not nodes:  # down to the projection's node
        nodes += [type(n).__name__ for n, _ in node.next_functions if n is not None and "Projection" in type(n).__name__]
        node = next((n for n, _ in node.next_functions if n is not None), None)
    got = torch.autograd.grad(y.sum(), (x, *mod.parameters()))
    assert bound == [] and nodes == ["_ProjectionEagerBackward"]
    want = torch.autograd.grad(ref(x)[0].sum(), (x, *ref.parameters()))
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, atol=1e-4, rtol=1e-4)
    assert backends_used(ran) == {backend}


@pytest.mark.parametrize("I,through_mm", [(1024, True), (64, False)])
def test_a_small_projection_goes_through_mm_from_its_macs(I, through_mm, monkeypatch):
    """Below the cached buffers' size (1 MiB of xw) the input projection and its two gradients run through
    the backend's ``mm`` from its ``mm_min_macs`` multiply-adds (T64 B1 H64 LSTM, I=1024: 2^24 against the
    rule's 2^21), torch's F.linear below it (I=64: 2^20); outputs and gradients are torch.nn's either way."""
    from fastrnn import functional
    calls = []
    backend = dispatch.get("cpp")  # the object the modules run (a test here reloads the backend's module)
    real = backend.mm

    def counted(a, ta, b, tb, bias):
        calls.append((tuple(a.shape), ta, tuple(b.shape), tb))
        return real(a, ta, b, tb, bias)
    monkeypatch.setattr(type(backend), "mm", staticmethod(counted))
    monkeypatch.setattr(type(backend), "mm_min_macs", 1 << 21)  # the rule's value where the CPU is not Intel's
    torch.manual_seed(0)
    T, H = 64, 64
    assert (T * 4 * H * I >= 1 << 21) == through_mm and T * 4 * H * 4 < functional._ALLOC_MIN_BYTES
    mod, ref = fastrnn.LSTM(I, H, backend="cpp"), torch.nn.LSTM(I, H)
    ref.load_state_dict(mod.state_dict())
    x = torch.randn(T, 1, I)
    with dispatch.record_calls() as ran:
        got = trained_outputs(mod, x)
    assert backends_used(ran) == {"cpp"}
    for a, b in zip(got, trained_outputs(ref, x), strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    # the forward's product (x @ W_ih^T), then the backward's dx (g @ W_ih) and dW_ih (g^T @ x)
    want = [((T, I), False, (4 * H, I), True), ((T, 4 * H), False, (4 * H, I), False),
            ((T, 4 * H), True, (T, I), False)]
    assert sorted(calls) == (sorted(want) if through_mm else [])


@pytest.mark.parametrize("products", ["torch", "mm-own", "mm-torch"])
def test_projection_gradients_and_double_backward(products):
    """_Projection's backward (dx into a cached buffer; or with the backend's ``mm``, its packed kernel
    forced, or torch's product inside the op) and its create_graph branch, in float64."""
    from fastrnn.functional import _Projection
    mm = None if products == "torch" else cpp.BACKEND.mm
    old = cpp._C.set_own_mm({"mm-own": 1, "mm-torch": 0}.get(products, -1))
    try:
        _projection_gradients(_Projection, mm)
    finally:
        cpp._C.set_own_mm(old)


def _projection_gradients(_Projection, mm):
    x = torch.randn(300, 1000, dtype=torch.float64, requires_grad=True)  # dx: 2.3 MiB, a cached block
    w = torch.randn(7, 1000, dtype=torch.float64, requires_grad=True)
    b = torch.randn(7, dtype=torch.float64, requires_grad=True)
    y = _Projection.apply(x, w, b, cpp.BACKEND.empty, mm)
    torch.testing.assert_close(y, torch.nn.functional.linear(x, w, b), atol=1e-12, rtol=1e-12)
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, w, b), g)
    want = torch.autograd.grad(torch.nn.functional.linear(x, w, b), (x, w, b), g)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, atol=1e-10, rtol=1e-10)
    small = (torch.randn(4, 3, dtype=torch.float64, requires_grad=True),
             torch.randn(5, 3, dtype=torch.float64, requires_grad=True))
    fn = lambda x_, w_: _Projection.apply(x_, w_, None, cpp.BACKEND.empty, mm)  # noqa: E731
    assert torch.autograd.gradcheck(fn, small)
    assert torch.autograd.gradgradcheck(fn, small)


@pytest.mark.parametrize("own", [1, 0], ids=["packed-kernel", "torch-product"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_mm_op_equals_torch(dtype, own):
    """fastrnn_cpp::mm (the large products of a call, csrc/gemm.cpp) against torch: every transpose
    combination, with and without a bias, at shapes with partial register blocks (M % 8), partial column
    blocks (N % 32), and more than one block of rows (128) and of k (256); split by rows (A^T of more
    than one k block, or an odd number of column blocks, from 16 rows a thread: N=70 and 96 with their
    partial last block and the bias) and by columns; its packed kernel forced on (the shapes are below
    own_mm's size rule) and off."""
    old = cpp._C.set_own_mm(own)
    tol = dict(atol=1e-4, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-11, rtol=1e-11)
    try:
        torch.manual_seed(0)
        for M, N, K in ((1, 1, 1), (7, 33, 5), (16, 64, 513), (130, 70, 300), (9, 100, 2), (300, 64, 600),
                        (257, 96, 513)):
            for ta in (False, True):
                for tb in (False, True):
                    a = torch.randn((K, M) if ta else (M, K), dtype=dtype)
                    b = torch.randn((N, K) if tb else (K, N), dtype=dtype)
                    bias = torch.randn(N, dtype=dtype)
                    want = (a.t() if ta else a) @ (b.t() if tb else b)
                    torch.testing.assert_close(cpp.BACKEND.mm(a, ta, b, tb, None), want, **tol)
                    torch.testing.assert_close(cpp.BACKEND.mm(a, ta, b, tb, bias), want + bias, **tol)
        a = torch.full((3, 0), 1.0, dtype=dtype)  # K = 0: the bias alone
        torch.testing.assert_close(cpp.BACKEND.mm(a, False, torch.ones(0, 4, dtype=dtype), False,
                                                  torch.arange(4, dtype=dtype)), torch.arange(4, dtype=dtype).expand(3, 4))
    finally:
        cpp._C.set_own_mm(old)


def test_mm_op_checks_its_arguments():
    a, b = torch.randn(4, 3), torch.randn(3, 5)
    with pytest.raises(RuntimeError, match=r"mm of \[4, 3\] and \[5, 3\]"):
        cpp.BACKEND.mm(a, False, b.t().contiguous(), False, None)
    with pytest.raises(RuntimeError, match="b must be contiguous"):
        cpp.BACKEND.mm(a, False, torch.randn(5, 3).t(), False, None)
    with pytest.raises(RuntimeError, match="b has dtype Double but the input has Float"):
        cpp.BACKEND.mm(a, False, b.double(), False, None)
    with pytest.raises(RuntimeError, match=r"bias must have shape \[5\]"):
        cpp.BACKEND.mm(a, False, b, False, torch.randn(4))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_a_transposed_product_reads_its_slivers_in_place_or_packed_alike(dtype):
    """An A^T product (a weight gradient) reads A^T's 8-row slivers in place where packing them does not pay
    (four column blocks or fewer, or rows of a that are not a multiple of 4 KiB: csrc/gemm.cpp, at_in_place)
    and packs them otherwise: both forms the same micro kernel on the same values in the same order of k, so
    the same bits, and torch's values; split by rows and by columns, partial row and column blocks, K past one
    block of 256."""
    assert cpp._C.at_in_place(64, 1024) and cpp._C.at_in_place(128, 1024) and cpp._C.at_in_place(256, 768)
    assert cpp._C.at_in_place(256, 256)
    assert not cpp._C.at_in_place(256, 1024) and not cpp._C.at_in_place(160, 1024)
    assert not cpp._C.at_in_place(512, 2048)
    old_own, old_pack = cpp._C.set_own_mm(1), cpp._C.set_at_pack(-1)
    tol = dict(atol=1e-4, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-11, rtol=1e-11)
    try:
        torch.manual_seed(0)
        # split by rows: K past one block of 256, or an odd number of column blocks; by columns: K within one
        # block and an even number of them (256 x 64 x 200, 512 x 256 x 100)
        for M, N, K in ((256, 64, 3200), (256, 256, 600), (1024, 256, 300), (130, 70, 300), (300, 40, 513),
                        (1024, 96, 257), (256, 64, 200), (512, 256, 100)):
            a = torch.randn(K, M, dtype=dtype)
            for tb in (False, True):
                b = torch.randn((N, K) if tb else (K, N), dtype=dtype)
                bias = torch.randn(N, dtype=dtype)
                want = a.t() @ (b.t() if tb else b)
                got = {}
                for mode in (-1, 0, 1):
                    cpp._C.set_at_pack(mode)
                    got[mode] = cpp.BACKEND.mm(a, True, b, tb, None)
                    torch.testing.assert_close(cpp.BACKEND.mm(a, True, b, tb, bias), want + bias, **tol)
                torch.testing.assert_close(got[0], got[1], rtol=0, atol=0)
                torch.testing.assert_close(got[-1], got[1], rtol=0, atol=0)
                torch.testing.assert_close(got[0], want, **tol)
    finally:
        cpp._C.set_own_mm(old_own)
        cpp._C.set_at_pack(old_pack)


def test_own_mm_rule():
    """The packed kernel takes the large products on CPUs that are not Intel's (MKL's own kernels serve
    those; NOTES.md, fifteenth session), never the small ones or fewer than 32 columns."""
    from fastrnn.policy import cpu_vendor
    assert cpp._C.own_mm(1600, 1024, 256) == (cpu_vendor() != "intel")
    assert not cpp._C.own_mm(1600, 16, 256) and not cpp._C.own_mm(8, 8, 8)


@pytest.mark.parametrize("name,H,B", [("RNN", 300, 1), ("RNN", 300, 8), ("LSTM", 80, 3), ("GRU", 96, 5)])
def test_a_few_rows_take_the_whole_depth_of_the_panel_at_once(name, H, B, ran):
    """Up to 8 rows (one register block) the packed product runs each column block over the whole depth K in
    one pass, K past the KC = 256 slices: the RNN's forward (K = H = 300), the LSTM's and GRU's backward
    (K = G x H = 320, 288); outputs and every gradient are torch.nn's."""
    torch.manual_seed(7)
    ref = getattr(torch.nn, name)(12, H)
    mod = getattr(fastrnn, name)(12, H, backend="cpp")
    mod.load_state_dict(ref.state_dict())
    x = torch.randn(9, B, 12)
    for a, e in zip(trained_outputs(mod, x), trained_outputs(ref, x), strict=True):
        torch.testing.assert_close(a, e, atol=2e-5, rtol=1e-4)
    assert backends_used(ran) == {"cpp"}


class _GradYSpy:
    """cpp.OPS with its sequence backwards noting the strides of the grad_y they are given."""

    def __init__(self, ops):
        self.ops, self.strides = ops, []

    def __getattr__(self, name):
        op = getattr(self.ops, name)
        if not name.endswith("_seq_bwd"):
            return op

        def call(grad_y, *args):
            self.strides.append((tuple(grad_y.stride()), grad_y.is_contiguous()))
            return op(grad_y, *args)
        return call


# (name, module kwargs, input form, loss): the gradients autograd hands the sequence backward as they come
GRAD_Y_CASES = [
    ("LSTM", {}, "dense", "sum"),            # y.sum(): an expanded one, strides all 0
    ("GRU", {"batch_first": True}, "dense", "weighted"),  # batch_first: [T,B,H] transposed from [B,T,H]
    ("RNN", {}, "dense", "h_n"),             # y has no gradient: an expanded zero
    ("LSTM", {"proj_size": 5}, "packed", "sum"),  # packed rows [N,P], expanded
    ("GRU", {"num_layers": 2, "bidirectional": True}, "dense", "weighted"),  # each direction's a slice of cat's
]


@pytest.mark.parametrize("name,kw,form,loss", GRAD_Y_CASES,
                         ids=[f"{c[0]}-{c[2]}-{c[3]}" + ("-bi" if c[1].get("bidirectional") else "") for c in GRAD_Y_CASES])
def test_the_backward_reads_grad_y_as_it_comes(name, kw, form, loss, monkeypatch, ran):
    """The sequence backward takes grad_y with its strides (``strided_grad_y``): an expanded or transposed
    gradient reaches the kernel without a contiguous copy, and every gradient is torch.nn's."""
    spy = _GradYSpy(cpp.OPS)
    monkeypatch.setattr(cpp, "OPS", spy)
    torch.manual_seed(5)
    ref = getattr(torch.nn, name)(7, 9, **kw)
    mod = getattr(fastrnn, name)(7, 9, backend="cpp", **kw)
    mod.load_state_dict(ref.state_dict())
    T, B = 6, 4
    x = torch.randn(B, T, 7) if kw.get("batch_first") else torch.randn(T, B, 7)
    weights = None

    def run(m):
        nonlocal weights
        xg = x.clone().requires_grad_()
        inp = xg
        if form == "packed":
            inp = torch.nn.utils.rnn.pack_padded_sequence(xg, torch.tensor([6, 6, 4, 2]))
        out, st = m(inp)
        y = out.data if form == "packed" else out
        h = st[0] if isinstance(st, tuple) else st
        if loss == "sum":
            total = y.sum() + h.sum()
        elif loss == "h_n":
            total = (h * torch.arange(h.numel()).view_as(h)).sum()
        else:
            if weights is None:
                weights = torch.randn(y.shape)  # contiguous in the caller's layout, as a loss makes it
            total = (y * weights).sum() + h.sum()
        total.backward()
        return [y, h, xg.grad] + [p.grad for p in m.parameters()]

    got, want = run(mod), run(ref)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, atol=1e-4, rtol=1e-4)
    assert backends_used(ran) == {"cpp"}
    assert len(spy.strides) == (4 if kw.get("bidirectional") else 1)
    for stride, contiguous in spy.strides:
        assert not contiguous, stride
        # transposed or sliced (columns one apart), or expanded (every stride 0)
        assert stride[-1] == 1 if loss == "weighted" else set(stride) == {0}, stride


@pytest.mark.skipif(torch.get_num_threads() < 2, reason="a team needs two of torch's threads")
@pytest.mark.parametrize("split", ["units", "rows"])
@pytest.mark.parametrize("family,packed", [("lstm", False), ("lstm-proj", False), ("gru", False), ("rnn", False),
                                           ("gru", True), ("lstm-proj", True)])
def test_a_strided_grad_y_gives_the_contiguous_ones_result(family, packed, split):
    """The raw sequence backward on a team of two (split by units, or by rows where the call allows it: not
    packed rows): grad_y transposed, sliced, every other row or expanded gives bit for bit what its contiguous
    copy gives, dense [T,B,P] or a packed sequence's rows [N,P], with a projection's dh too."""
    torch.manual_seed(6)
    T, B, H, P = 6, 5, 64, (24 if family == "lstm-proj" else 64)
    G = {"lstm": 4, "lstm-proj": 4, "gru": 3, "rnn": 1}[family]
    lengths = torch.tensor([6, 6, 4, 3, 1]) if packed else None
    N = int(lengths.sum()) if packed else None
    lead = (N,) if packed else (T, B)
    xw, w_hh, b_hh = torch.randn(*lead, G * H), torch.randn(G * H, P) * 0.2, torch.randn(G * H)
    h0 = torch.randn(B, P)
    op = cpp.OPS
    if family.startswith("lstm"):
        c0, w_hr = torch.randn(B, H), (torch.randn(P, H) * 0.2 if P != H else None)
        mid = (b_hh, w_hr, None, None, None, None, None, None, None)
        y, h_n, c_n, ws = op.lstm_seq_fwd(xw, w_hh, *mid, h0, c0, lengths, False, False, 0.0, 0.0, True)

        def bwd(g):
            return op.lstm_seq_bwd(g, torch.ones(B, P), torch.ones(B, H), xw, w_hh, *mid, h0, c0, lengths, y, ws, False,
                                   False, 0.0, 0.0)
    elif family == "gru":
        y, h_n, ws = op.gru_seq_fwd(xw, w_hh, b_hh, None, None, None, h0, lengths, False, 0.0, True)

        def bwd(g):
            return op.gru_seq_bwd(g, torch.ones(B, H), xw, w_hh, b_hh, None, None, None, h0, lengths, y, ws, False,
                                  0.0)
    else:
        y, h_n, ws = op.rnn_seq_fwd(xw, w_hh, b_hh, h0, None, False, "tanh", True)

        def bwd(g):
            return op.rnn_seq_bwd(g, torch.ones(B, H), xw, w_hh, b_hh, h0, None, y, ws, False, "tanh")
    forms = {"sliced": torch.randn(*lead, 2 * P)[..., P:], "every other row": torch.randn(2 * lead[0], *lead[1:], P)[::2],
             "expanded": torch.tensor(0.5).expand(*lead, P)}
    if not packed:
        forms["transposed"] = torch.randn(B, T, P).transpose(0, 1)
    old_macs, old_split = cpp.BACKEND.set_parallel_min_macs(0), cpp._C.set_row_split(1 if split == "rows" else 0)
    try:
        by_rows = cpp._C.row_split_count()
        for what, g in forms.items():
            assert not g.is_contiguous() and g.shape == y.shape
            for a, e in zip(bwd(g), bwd(g.contiguous()), strict=True):
                assert torch.equal(a, e), what
        by_rows = cpp._C.row_split_count() - by_rows
    finally:
        cpp.BACKEND.set_parallel_min_macs(old_macs)
        cpp._C.set_row_split(old_split)
    # by rows: each backward (and the LSTM's forward, here once) of a dense call; packed rows never
    assert (by_rows > 0) == (split == "rows" and not packed), by_rows


@pytest.mark.parametrize("own", [1, 0], ids=["packed-kernel", "torch-product"])
@pytest.mark.parametrize("name", ["LSTM", "LSTM-proj", "GRU", "RNN"])
def test_training_through_the_mm_op(name, own, ran):
    """A training call's projection, its gradients and d W_hh (and d W_hr) through fastrnn_cpp::mm, its
    packed kernel forced on and off: torch.nn's outputs and gradients."""
    cls = name.split("-")[0]
    kw = dict(proj_size=40) if name.endswith("proj") else {}
    mod, ref = _big_pair(getattr(fastrnn, cls), getattr(torch.nn, cls), **kw)
    old = cpp._C.set_own_mm(own)
    try:
        x = torch.randn(BIG["T"], BIG["B"], BIG["I"], requires_grad=True)
        y, _ = mod(x)
        y_ref, _ = ref(x)
        g = torch.randn_like(y)
        got = torch.autograd.grad(y, (x, *mod.parameters()), g)
        want = torch.autograd.grad(y_ref, (x, *ref.parameters()), g)
    finally:
        cpp._C.set_own_mm(old)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, atol=1e-4, rtol=1e-4)
    assert backends_used(ran) == {"cpp"}


def test_cached_packed_training_after_dense_calls():
    """Reused blocks are dirty: the ragged forward and backward must not read what a previous call left
    (their zero-filled buffers come from the cache too)."""
    from torch.nn.utils.rnn import pack_padded_sequence
    mod, ref = _big_pair(fastrnn.LSTM, torch.nn.LSTM)
    x = torch.randn(BIG["T"], BIG["B"], BIG["I"])
    y, _ = mod(x.requires_grad_(True))  # dense call: fills the blocks with data
    y.sum().backward()
    del y
    lengths = torch.randint(1, BIG["T"] + 1, (BIG["B"],))
    lengths[0] = BIG["T"]
    res = []
    for m in (mod, ref):
        xi = x.detach().clone().requires_grad_(True)
        out, (h, c) = m(pack_padded_sequence(xi, lengths, enforce_sorted=False))
        loss = (out.data * out.data).sum() + h.sum() + c.sum()
        res.append([out.data, h, c, *torch.autograd.grad(loss, [xi, *m.parameters()])])
    for a, b in zip(*res):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_cached_packed_input():
    from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence
    mod, ref = _big_pair(fastrnn.LSTM, torch.nn.LSTM)
    x = torch.randn(BIG["T"], BIG["B"], BIG["I"])
    lengths = torch.randint(1, BIG["T"] + 1, (BIG["B"],))
    lengths[0] = BIG["T"]
    with torch.no_grad():
        packed = pack_padded_sequence(x, lengths, enforce_sorted=False)
        y, (h, c) = mod(packed)
        y_ref, (h_ref, c_ref) = ref(packed)
    torch.testing.assert_close(pad_packed_sequence(y)[0], pad_packed_sequence(y_ref)[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close((h, c), (h_ref, c_ref), atol=1e-5, rtol=1e-5)


def test_cache_reuses_blocks_and_empties():
    mod, _ = _big_pair(fastrnn.LSTM, torch.nn.LSTM)
    x = torch.randn(BIG["T"], BIG["B"], BIG["I"])
    with torch.no_grad():
        mod(x)
        held = cpp.BACKEND.cache_info()
        for _ in range(3):
            mod(x)
    after = cpp.BACKEND.cache_info()
    # the repeated calls took the blocks the first one gave back: nothing new was kept
    assert after["in_use"] + after["idle"] == held["in_use"] + held["idle"] and after["idle"] > 0
    # turned off without trimming: calls bypass the cache, the idle blocks stay; with trimming they go
    old = cpp.BACKEND.set_cache_limit(0, trim=False)
    try:
        with torch.no_grad():
            y, _ = mod(x)
        off = cpp.BACKEND.cache_info()
        assert off == {"in_use": after["in_use"], "idle": after["idle"], "cap": 0}
        cpp.BACKEND.set_cache_limit(0)
        assert cpp.BACKEND.cache_info()["idle"] == 0
    finally:
        assert cpp.BACKEND.set_cache_limit(old) == 0
    assert cpp.BACKEND.cache_info()["cap"] == old << 20
    with torch.no_grad():
        mod(x)
    assert cpp.BACKEND.cache_info()["idle"] > 0
    cpp.BACKEND.empty_cache()
    assert cpp.BACKEND.cache_info()["idle"] == 0


def test_cache_reuses_a_slightly_larger_block_and_pushes_out_the_oldest():
    cpp.BACKEND.empty_cache()
    a = cpp.BACKEND.empty([1 << 20], torch.float32)  # 4 MiB
    del a
    b = cpp.BACKEND.empty([(1 << 20) - 50000], torch.float32)  # a little smaller: takes that block
    assert cpp.BACKEND.cache_info()["idle"] == 0
    del b
    old = cpp.BACKEND.set_cache_limit(6)  # MiB: room for one 4 MiB block only
    try:
        c, d = cpp.BACKEND.empty([1 << 20], torch.float32), cpp.BACKEND.empty([1 << 20], torch.float32)
        del c  # idle: c's block
        del d  # the cache is full: c's (older) block goes, d's stays
        assert cpp.BACKEND.cache_info()["idle"] == 4 << 20
    finally:
        cpp.BACKEND.set_cache_limit(old)


def test_cached_tensor_is_filled_under_deterministic_algorithms():
    """As torch.empty is (torch.utils.deterministic.fill_uninitialized_memory)."""
    torch.use_deterministic_algorithms(True)
    try:
        t = cpp.BACKEND.empty([512, 1024], torch.float32)
        assert t.isnan().all()
    finally:
        torch.use_deterministic_algorithms(False)


def test_cached_tensor_is_an_ordinary_tensor():
    t = cpp.BACKEND.empty([512, 1024], torch.float32)  # 2 MiB: from the cache
    assert t.shape == (512, 1024) and t.dtype == torch.float32 and t.device.type == "cpu"
    t.fill_(2.0)
    t.resize_(1024, 1024)  # its storage grows through the same allocator
    t[512:] = 3.0
    assert t[:512].eq(2.0).all() and t[512:].eq(3.0).all()
    assert torch.equal(torch.load(_saved(t), weights_only=True), t)
    t.share_memory_()  # torch.multiprocessing moves the data into shared memory; the block comes back
    assert t.is_shared() and t[:512].eq(2.0).all() and t[512:].eq(3.0).all()
    small = cpp.BACKEND.empty([3, 4], torch.float64)  # under 1 MiB: torch's CPU allocator
    assert small.shape == (3, 4) and small.dtype == torch.float64


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs os.fork")
def test_cache_works_in_a_forked_child():
    """The pool's lock is taken around fork() (pthread_atfork): a child can allocate, and sees the parent's
    cached outputs. (The child avoids torch's OpenMP ops: GNU OpenMP does not survive fork in torch.)"""
    import os
    mod, _ = _big_pair(fastrnn.LSTM, torch.nn.LSTM)
    with torch.no_grad():
        y, _ = mod(torch.randn(BIG["T"], BIG["B"], BIG["I"]))
    expected = y.numpy().astype("float64").sum()
    pid = os.fork()
    if pid == 0:
        ok = abs(y.numpy().astype("float64").sum() - expected) < 1e-6
        z = cpp.BACKEND.empty([512, 1024], torch.float32)
        os._exit(0 if ok and z.shape == (512, 1024) else 1)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0


def _saved(t):
    import io
    buf = io.BytesIO()
    torch.save(t, buf)
    buf.seek(0)
    return buf


def test_cache_allocations_are_seen_by_the_profiler():
    """The benchmark's peak memory comes from torch's profiler: cached blocks must be reported to it."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        t = cpp.BACKEND.empty([256, 1024], torch.float32)
        del t
    mem = [e.cpu_memory_usage for e in prof.events() if e.cpu_memory_usage]
    assert 256 * 1024 * 4 in mem and -256 * 1024 * 4 in mem


def test_cache_off_and_bad_setting():
    """FASTRNN_CPU_CACHE_MB=0 turns the cache off, with the same results; a malformed value makes the cpp
    backend unavailable with that reason (fastrnn itself still works)."""
    import subprocess
    code = ("import torch, fastrnn; from fastrnn import dispatch; from fastrnn.backends import cpp\n"
            "torch.manual_seed(0); m = fastrnn.LSTM(24, 128); x = torch.randn(40, 64, 24)\n"
            "r = fastrnn.LSTM(24, 128, backend='reference'); r.load_state_dict(m.state_dict())\n"
            "with torch.no_grad(), dispatch.record_calls() as ran: y = m(x)[0]\n"
            "with torch.no_grad(): y_ref = r(x)[0]\n"
            "print(cpp.BACKEND.cache_info(), {b for _, b in ran}, float((y - y_ref).abs().max()) < 1e-5)")
    env = dict(__import__("os").environ, FASTRNN_CPU_CACHE_MB="0")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "{'in_use': 0, 'idle': 0, 'cap': 0} {'cpp'} True"
    why = "import fastrnn; from fastrnn import dispatch; print(dispatch.reasons('cpp'))"
    for bad in ("lots", "-1", "99999999999999999999"):
        env["FASTRNN_CPU_CACHE_MB"] = bad
        out = subprocess.run([sys.executable, "-c", why], env=env, capture_output=True, text=True, check=True).stdout
        assert f"FASTRNN_CPU_CACHE_MB must be a whole number of MiB >= 0, got '{bad}'" in out


def _team_case_outputs(make, x, lengths, train):
    """Outputs (and with ``train`` the input's and parameters' gradients) of ``make()``'s module on ``x``
    (packed with ``lengths`` when given)."""
    torch.manual_seed(3)
    m = make()
    xg = x.detach().requires_grad_(train)
    inp = xg if lengths is None else torch.nn.utils.rnn.pack_padded_sequence(xg, lengths, enforce_sorted=False)
    with torch.set_grad_enabled(train):
        out, st = m(inp)
    st = st if isinstance(st, tuple) else (st,)
    out = out.data if lengths is not None else out
    if not train:
        return [out, *st]
    (out.pow(2).sum() + sum(s.sum() for s in st)).backward()
    return [out, *st, xg.grad, *(p.grad for p in m.parameters())]


@pytest.mark.skipif(torch.get_num_threads() < 2, reason="a team needs two of torch's threads")
@pytest.mark.parametrize("split", ["units", "rows"])
def test_a_late_thread_joins_the_team_and_the_numbers_do_not_change(split, ran):
    """A team does not wait for a thread that starts late (csrc/recurrence.h, Team): the first thread in
    runs every worker's share until the others are in, then hands them their shares at a step boundary.
    With the other threads held back until a given step (so that they join in the middle of a call, or after
    its last step)
    the forward and backward of each cell, with a projection, layer norm (a pass in phases), two
    bidirectional layers, a packed sequence and int8 weights give the numbers of a team that starts
    together, bit for bit, and both paths ran; with the dense calls split by units, and by rows (forced
    here on 4 rows; the packed and layer-norm calls stay split by units)."""
    T, B, H = 60, 4, 64  # two blocks of units: a team of two
    x = torch.randn(T, B, H)
    lengths = torch.tensor([60, 41, 33, 7])
    cases = [
        (lambda: fastrnn.LSTM(H, H, backend="cpp"), x, None, True),
        (lambda: fastrnn.LSTM(H, H, proj_size=16, num_layers=2, bidirectional=True, backend="cpp"), x, None, True),
        (lambda: fastrnn.LSTM(H, H, layer_norm=True, backend="cpp"), x, None, True),
        (lambda: fastrnn.GRU(H, H, num_layers=2, bidirectional=True, backend="cpp"), x, lengths, True),
        (lambda: fastrnn.RNN(H, H, backend="cpp"), x, None, True),
        (lambda: fastrnn.GRU(H, H, backend="cpp"), x, lengths, False),
        (lambda: fastrnn.quantize(fastrnn.LSTM(H, H, backend="cpp"), torch.qint8), x, None, False),
    ]
    old_macs = cpp.BACKEND.set_parallel_min_macs(0)
    old_split = cpp._C.set_row_split(1 if split == "rows" else 0)
    try:
        by_rows = cpp._C.row_split_count()
        want = [_team_case_outputs(*c) for c in cases]
        by_rows = cpp._C.row_split_count() - by_rows
        before = cpp._C.team_counts()
        for join_at in (1, 2, 25, 10 ** 6):  # before the first step, at steps 1 and 24, after the last
            old = cpp._C.set_team_join_at(join_at)
            try:
                got = [_team_case_outputs(*c) for c in cases]
            finally:
                cpp._C.set_team_join_at(old)
            for k, (g, w) in enumerate(zip(got, want)):
                assert len(g) == len(w)
                for a, b in zip(g, w):
                    assert torch.equal(a, b), (k, join_at)
        joined, ended = (a - b for a, b in zip(cpp._C.team_counts(), before))
    finally:
        cpp.BACKEND.set_parallel_min_macs(old_macs)
        cpp._C.set_row_split(old_split)
    assert joined > 0 and ended > 0, (joined, ended)
    # by rows: the forward and backward of the LSTM, each layer-direction of the 2-layer bidirectional one,
    # the RNN's
    assert by_rows == (2 + 8 + 2 if split == "rows" else 0)
    assert backends_used(ran) == {"cpp"}


# cells and options a call split by rows serves (Layout): the LSTM with a projection, peephole weights (the
# backward stays split by units: each worker accumulates its units' peephole gradients), two bidirectional
# layers; the GRU; the RNN with either nonlinearity
ROW_CASES = [("LSTM", {}, 2), ("LSTM", {"proj_size": 24}, 2), ("LSTM", {"peephole": True}, 1),
             ("LSTM", {"num_layers": 2, "bidirectional": True}, 8), ("GRU", {}, 2), ("RNN", {}, 2),
             ("RNN", {"nonlinearity": "relu"}, 2)]


@pytest.mark.skipif(torch.get_num_threads() < 2, reason="a split by rows needs two of torch's threads")
@pytest.mark.parametrize("name,kw,calls", ROW_CASES)
@pytest.mark.parametrize("T,B", [(5, 3), (40, 17)])
def test_a_call_split_by_rows_matches_torch(name, kw, calls, T, B, ran):
    """Split by batch rows (forced here; each worker all units of its rows, no barrier a step), a sequence's
    forward and backward, with a given state, match torch.nn (the reference backend for the peephole LSTM)
    in float64, and the split ran; uneven shares of rows (3 over two workers: 2 / 1; 17: 9 / 8)."""
    cls = getattr(fastrnn, name)
    torch.manual_seed(0)
    ours = cls(6, 40, backend="cpp", dtype=torch.float64, **kw)
    ref = (cls(6, 40, backend="reference", dtype=torch.float64, **kw) if kw.get("peephole")
           else getattr(torch.nn, name)(6, 40, dtype=torch.float64, **kw))
    ref.load_state_dict(ours.state_dict())
    D, P = 2 if ours.bidirectional else 1, kw.get("proj_size") or 40
    x = torch.randn(T, B, 6, dtype=torch.float64)
    h0 = torch.randn(ours.num_layers * D, B, P, dtype=torch.float64)
    hx = (h0, torch.randn(ours.num_layers * D, B, 40, dtype=torch.float64)) if name == "LSTM" else h0
    old_macs, old_split = cpp.BACKEND.set_parallel_min_macs(0), cpp._C.set_row_split(1)
    try:
        before = cpp._C.row_split_count()
        got = _outputs_and_grads(ours, x, hx)
        by_rows = cpp._C.row_split_count() - before
    finally:
        cpp.BACKEND.set_parallel_min_macs(old_macs)
        cpp._C.set_row_split(old_split)
    want = _outputs_and_grads(ref, x, hx)
    assert by_rows == calls
    assert len(got) == len(want)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)
    assert backends_used(ran) == ({"cpp", "reference"} if kw.get("peephole") else {"cpp"})


@pytest.mark.skipif(torch.get_num_threads() < 2, reason="a split by rows needs two of torch's threads")
@pytest.mark.parametrize("name,kw", [("LSTM", {}), ("LSTM", {"proj_size": 24}), ("GRU", {}), ("RNN", {}),
                                     ("LSTM", {"num_layers": 2, "bidirectional": True})])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("B,I", [(17, 6), (16, 300)])
def test_the_split_by_rows_projects_a_block_of_steps_in_one_product(name, kw, dtype, B, I, ran):
    """In inference split by rows, the fused input projection of a block of steps is one product over the
    worker's rows of every step (recurrence.h, gemm_groups) instead of one product a step: torch.nn's outputs,
    and the same bits as a product a step where the depth I is one block of the kernel (17 rows: 9 / 8 a worker,
    blocks of 14 and 16 steps and a partial last one; I = 300: two blocks of depth, 8 rows a worker)."""
    cls = getattr(fastrnn, name)
    torch.manual_seed(0)
    ours = cls(I, 40, backend="cpp", dtype=dtype, **kw)
    ref = getattr(torch.nn, name)(I, 40, dtype=dtype, **kw)
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(37, B, I, dtype=dtype)
    old_macs, old_split = cpp.BACKEND.set_parallel_min_macs(0), cpp._C.set_row_split(1)
    old_groups = cpp._C.set_proj_groups(1)
    try:
        with torch.no_grad():
            before = cpp._C.row_split_count()
            got = ours(x)
            by_rows = cpp._C.row_split_count() - before
            cpp._C.set_proj_groups(0)
            per_step = ours(x)
            want = ref(x)
    finally:
        cpp.BACKEND.set_parallel_min_macs(old_macs)
        cpp._C.set_row_split(old_split)
        cpp._C.set_proj_groups(old_groups)
    assert by_rows == ours.num_layers * (2 if ours.bidirectional else 1)
    flat = lambda out: [out[0], *(out[1] if isinstance(out[1], tuple) else (out[1],))]  # noqa: E731
    tol = dict(atol=1e-10, rtol=1e-10) if dtype == torch.float64 else dict(atol=2e-5, rtol=2e-5)
    for a, s, w in zip(flat(got), flat(per_step), flat(want), strict=True):
        torch.testing.assert_close(a, w, **tol)
        if I <= 256:
            assert torch.equal(a, s)
        else:
            torch.testing.assert_close(a, s, **tol)
    assert backends_used(ran) == {"cpp"}


@pytest.mark.parametrize("level", [1, 3, 4], ids=["baseline", "avx2", "avx512"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_each_isa_build_of_the_products_matches_torch(level, dtype, ran):
    """The products and the packing are built once an ISA, in vectors of its width (recurrence.h,
    FASTRNN_ISA_BUILDS: 64 bytes for AVX-512, 32 for AVX2, 16 for the baseline). Each build this CPU runs gives
    torch.nn's outputs and gradients: sequences at batch 1 and 17 (split by units and by rows), a depth of two
    blocks (input 300), a projection, inference (the fused input projection) and training (the mm op's own
    kernel, its A^T products), and the mm op itself."""
    if level > cpp._C.isa_detected():
        pytest.skip(f"this CPU runs the builds up to level {cpp._C.isa_detected()}, not {level}")
    tol = dict(atol=1e-10, rtol=1e-10) if dtype == torch.float64 else dict(atol=5e-5, rtol=5e-5)
    torch.manual_seed(0)
    old_cap, old_own = cpp._C.set_isa_cap(level), cpp._C.set_own_mm(1)
    old_macs = cpp.BACKEND.set_parallel_min_macs(0)
    try:
        assert cpp._C.isa_level() == level
        a, b = torch.randn(70, 300, dtype=dtype), torch.randn(300, 45, dtype=dtype)
        for ta, tb in ((False, False), (True, False), (False, True)):
            A, Bm = (a.t().contiguous() if ta else a), (b.t().contiguous() if tb else b)
            torch.testing.assert_close(torch.ops.fastrnn_cpp.mm(A, ta, Bm, tb, None), a @ b, **tol)
        for name, kw in (("LSTM", {}), ("LSTM", {"proj_size": 24}), ("GRU", {}), ("RNN", {})):
            ours = getattr(fastrnn, name)(300, 40, backend="cpp", dtype=dtype, **kw)
            ref = getattr(torch.nn, name)(300, 40, dtype=dtype, **kw)
            ref.load_state_dict(ours.state_dict())
            for B in (1, 17):
                x = torch.randn(9, B, 300, dtype=dtype)
                with torch.no_grad():
                    got, want = ours(x), ref(x)
                torch.testing.assert_close(got[0], want[0], **tol)
                for g, w in zip(_outputs_and_grads(ours, x, _zero_state(ours, B, dtype)),
                                _outputs_and_grads(ref, x, _zero_state(ours, B, dtype)), strict=True):
                    torch.testing.assert_close(g, w, **tol)
    finally:
        cpp._C.set_isa_cap(old_cap)
        cpp._C.set_own_mm(old_own)
        cpp.BACKEND.set_parallel_min_macs(old_macs)
    assert backends_used(ran) == {"cpp"}


def _zero_state(m, B, dtype):
    D = 2 if m.bidirectional else 1
    h0 = torch.zeros(m.num_layers * D, B, m.proj_size or m.hidden_size, dtype=dtype)
    return (h0, torch.zeros(m.num_layers * D, B, m.hidden_size, dtype=dtype)) if isinstance(m, torch.nn.LSTM) else h0


def _outputs_and_grads(m, x, hx):
    xg = x.clone().requires_grad_(True)
    state = tuple(s.clone().requires_grad_(True) for s in hx) if isinstance(hx, tuple) else hx.clone().requires_grad_(True)
    out, st = m(xg, state)
    st = st if isinstance(st, tuple) else (st,)
    (out.pow(2).sum() + sum((s * (k + 2)).sum() for k, s in enumerate(st))).backward()
    grads = [s.grad for s in (state if isinstance(state, tuple) else (state,))]
    return [out, *st, xg.grad, *grads, *(p.grad for p in m.parameters())]


@pytest.mark.skipif(torch.get_num_threads() < 2, reason="a split by rows needs two of torch's threads")
def test_the_split_by_rows_takes_small_weights_and_whole_blocks_of_rows():
    """The rule (csrc/recurrence.h, layout): a dense call whose recurrent weights fit a worker's L2 splits
    by rows from 8 rows a worker (H64: 64 KiB for the LSTM, within 3/4 of any L2 this runs on); fewer rows,
    a ragged batch, zoneout, recurrent dropout and layer norm split by units."""
    from torch.nn.utils.rnn import pack_padded_sequence
    torch.manual_seed(0)
    x = torch.randn(10, 64, 64)

    def runs_by_rows(m, inp):
        before = cpp._C.row_split_count()
        with torch.no_grad():
            m(inp)
        return cpp._C.row_split_count() - before

    old = cpp._C.set_row_split(-1)
    try:
        plain = fastrnn.LSTM(64, 64, backend="cpp")
        assert runs_by_rows(plain, x) == 1
        assert runs_by_rows(plain, x[:, :15]) == 0  # 15 rows: no register block of 8 for a second worker
        assert runs_by_rows(plain, x[:, :16]) == 1
        assert runs_by_rows(plain, pack_padded_sequence(x, torch.tensor([10] * 32 + [6] * 32))) == 0
        for kw in ({"zoneout": 0.2}, {"recurrent_dropout": 0.2}, {"layer_norm": True}):
            m = fastrnn.LSTM(64, 64, backend="cpp", **kw).train()
            before = cpp._C.row_split_count()
            m(x)[0].sum().backward()
            assert cpp._C.row_split_count() == before, kw
    finally:
        cpp._C.set_row_split(old)
