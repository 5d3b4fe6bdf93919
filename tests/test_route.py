"""Which path flexflash.attention takes (flexflash.functional.route), checked on CPU; the CUDA
routing to SDPA is checked in test_gpu.py."""

import pytest
import torch

import flexflash
from flexflash.functional import route

from .helpers import check_against_reference


def _qkv(grad=False, Nq=8, Nk=8):
    q = torch.randn(1, 2, Nq, 16, requires_grad=grad)
    k = torch.randn(1, 2, Nk, 16, requires_grad=grad)
    return q, k, torch.randn(1, 2, Nk, 16, requires_grad=grad)


def test_cpu_paths():
    """On CPU, SDPA takes what its CPU kernel computes exactly: dense, causal with Nq == Nk, one mask
    or bias tensor, grouped heads, float64, with or without gradients; the rest (mask_mods,
    combinations SDPA cannot take whole) runs compiled FlexAttention forward (float32 here) and the
    memory-bounded tiles for training; dropout and return_lse run the tiles."""
    q, k, v = _qkv()
    pad, bias = torch.rand(1, 8) > 0.3, torch.randn(8, 8)
    window = flexflash.mods.sliding_window(3)
    for grad in (False, True):
        q, k, v = _qkv(grad=grad)
        assert route(q, k, v) == "sdpa"
        assert route(q, k, v, causal=True) == "sdpa"
        assert route(q, k, v, mask=pad) == "sdpa"
        assert route(q, k, v, bias=bias) == "sdpa"
        assert route(q, k[:, :1], v[:, :1], causal=True) == "sdpa"  # grouped heads: SDPA's enable_gqa
        assert route(*(t.double() for t in (q, k, v)), causal=True) == "sdpa"
        tiles_or_flex = "memory-bounded" if grad else "flex"
        assert route(q, k, v, causal=True, mask=pad) == tiles_or_flex
        assert route(q, k, v, mask=pad, bias=bias) == tiles_or_flex
        assert route(q, k, v, mask_mod=window) == tiles_or_flex
        assert route(q, k, v, return_lse=True) == "memory-bounded"
        assert route(q, k, v, dropout_p=0.1) == "memory-bounded"
    q, k, v = _qkv()
    assert route(q[:, :, :5], k, v, causal=True) == "flex"  # SDPA's causal is top-left
    assert route(q, k, v, backend="reference") == "reference"
    assert route(*_qkv(Nq=0)) == "reference"  # empty problems
    assert route(q, k, v, backend="flex") == "flex"


def test_cpu_half_precision_masks_take_sdpas_kernel_in_tiles_without_a_warning():
    """Forward on CPU in bfloat16, a mask SDPA cannot take whole (a mask_mod, causal with a mask)
    runs SDPA's kernel tile by tile (faster there than FlexAttention's CPU template), silently, and
    equals the reference; so does float16 without a mask_mod; a score_mod, kernel_options, float32
    and float16 with a mask_mod keep FlexAttention."""
    import warnings

    from flexflash import functional
    from flexflash.plan import TILES_FASTER
    gen = torch.Generator().manual_seed(21)
    q, k, v = (torch.randn(2, 2, 300, 16, generator=gen).to(torch.bfloat16) for _ in range(3))
    window, pad = flexflash.mods.sliding_window(40), torch.rand(2, 300, generator=gen) > 0.2
    for kw in (dict(mask_mod=window), dict(causal=True, mask=pad)):
        plan = flexflash.explain(q, k, v, **kw)
        assert plan.path == "memory-bounded" and plan.reasons["flex"] == TILES_FASTER
        functional._NOTED.discard("cpu-chunked")
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a choice of speed is not announced
            flexflash.attention(q, k, v, **kw)
        check_against_reference(q, k, v, grads=False, **kw)
    assert route(q, k, v, mask_mod=window, score_mod=flexflash.mods.tanh_softcap(5.0)) == "flex"
    assert route(q, k, v, mask_mod=window, kernel_options={"BLOCK_M": 64}) == "flex"
    assert route(q.float(), k.float(), v.float(), mask_mod=window) == "flex"
    assert route(q.half(), k.half(), v.half(), mask_mod=window) == "flex"
    assert route(q.half(), k.half(), v.half(), causal=True, mask=pad) == "memory-bounded"
    assert route(q.float(), k.float(), v.float(), causal=True, mask=pad) == "flex"
    assert route(q, k, v, mask_mod=window, backend="flex") == "flex"


def test_cpu_sdpa_reasons(monkeypatch):
    """Why SDPA does not take a CPU call, for each rule of flexflash.plan."""
    from flexflash import plan as plan_module
    q, k, v = _qkv(grad=True)
    pad, bias = torch.rand(1, 8) > 0.3, torch.randn(8, 8, requires_grad=True)
    why = lambda **kw: flexflash.explain(q, k, v, **kw).reasons["sdpa"]  # noqa: E731
    assert "causal and a mask: SDPA takes one of them" in why(causal=True, mask=pad)
    assert "a mask and a bias" in why(mask=pad, bias=bias)
    assert "no dropout" in why(dropout_p=0.1)
    assert "top-left" in flexflash.explain(q[:, :, :5], k, v, causal=True).reasons["sdpa"]
    assert "D == Dv" in flexflash.explain(q, k, v[..., :8]).reasons["sdpa"]
    assert flexflash.explain(q, k, v, bias=bias).path == "sdpa"
    monkeypatch.setattr(plan_module, "_CPU_MATH_ENTRIES", 1 * 2 * 8 * 8 - 1)
    assert "math backend would hold B*Hq*Nq*Nk = 128" in why(bias=bias)
    with torch.no_grad():  # no gradient: the fused kernel takes the bias
        assert flexflash.explain(q, k, v, bias=bias).path == "sdpa"


def test_inputs_requiring_grad_under_no_grad_run_the_compiled_kernel():
    """Under no_grad a CPU call whose q, k, v and bias require grad takes the flex path, which
    FlexAttention's CPU entry would refuse for inputs that require grad (whatever the grad mode)."""
    q, k, v = _qkv(grad=True, Nq=24, Nk=40)
    bias = torch.randn(24, 40, requires_grad=True)
    expected = flexflash.reference.attention(q, k, v, bias=bias, causal=True).detach()
    with torch.no_grad():
        assert route(q, k, v, bias=bias, causal=True) == "flex"
        for backend in ("auto", "flex"):
            out = flexflash.attention(q, k, v, bias=bias, causal=True, backend=backend)
            assert not out.requires_grad
            # float32 against the float32 reference: the kernel and the reference sum in different orders.
            torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_route_raises_what_the_call_raises():
    q, k, v = _qkv(grad=True)
    with pytest.raises(NotImplementedError, match="backend='flex'.*backward"):
        route(q, k, v, backend="flex")
    with pytest.raises(NotImplementedError, match="backend='flex'.*backward"):
        flexflash.attention(q, k, v, backend="flex")
    with pytest.raises(ValueError, match="dropout_p"):
        route(q, k, v, dropout_p=1.0)
    with pytest.raises(TypeError, match="route: unknown keyword"):
        route(q, k, v, casual=True)


def test_route_agrees_with_the_call():
    """The path route() names is the one the call takes (the memory-bounded path announces itself)."""
    q, k, v = _qkv(grad=True)
    window = flexflash.mods.sliding_window(3)
    assert route(q, k, v, mask_mod=window) == "memory-bounded"
    from flexflash import functional
    functional._NOTED.discard("cpu-chunked")
    with pytest.warns(UserWarning, match="memory-bounded"):
        flexflash.attention(q, k, v, mask_mod=window)


def test_generator_names_the_kernel_generator_of_the_flex_path():
    """On CPU the FlexAttention path runs FlexAttention's own template ("triton" names the
    non-FLASH generator); calls on other paths have none; bad arguments raise as the call would."""
    from flexflash.functional import generator
    q = torch.randn(2, 2, 40, 16)
    window = flexflash.mods.sliding_window(3)
    with torch.no_grad():
        assert generator(q, q, q, mask_mod=window) == "triton"
        assert generator(q, q, q, causal=True) is None  # SDPA
        assert generator(q, q, q, backend="reference") is None
    assert generator(q.requires_grad_(), q, q, mask_mod=window) is None  # memory-bounded path on CPU
    with pytest.raises(TypeError, match="unknown keyword"):
        generator(q, q, q, casual=True)


def test_sdpa_route_puts_its_backends_first_for_the_call_only(monkeypatch):
    """The SDPA route runs SDPA with cuDNN, flash and efficient attention first in its priority
    order, restores the caller's order afterwards (also when SDPA raises), and leaves the enabled
    backends as the caller set them."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from flexflash import _sdpa
    real = torch.nn.functional.scaled_dot_product_attention
    seen = []

    def recording(*args, **kwargs):
        seen.append((torch._C._get_sdp_priority_order(), torch.backends.cuda.cudnn_sdp_enabled()))
        if kwargs.get("scale") == 0.0:
            raise RuntimeError("refused")
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording)
    q, k, v = _qkv()
    before = torch._C._get_sdp_priority_order()
    first = [int(SDPBackend.CUDNN_ATTENTION), int(SDPBackend.FLASH_ATTENTION), int(SDPBackend.EFFICIENT_ATTENTION)]
    out = _sdpa.sdpa(q, k, v, causal=True, scale=0.25)
    torch.testing.assert_close(out, real(q, k, v, is_causal=True, scale=0.25))
    order, cudnn_enabled = seen[-1]
    assert order[:3] == first and sorted(order) == sorted(before)
    assert torch._C._get_sdp_priority_order() == before
    with pytest.raises(RuntimeError, match="refused"):
        _sdpa.sdpa(q, k, v, causal=False, scale=0.0)
    assert torch._C._get_sdp_priority_order() == before
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]):  # the caller turned cuDNN off
        _sdpa.sdpa(q, k, v, causal=True, scale=0.25)
        order, cudnn_enabled = seen[-1]
        assert order[:3] == first and not cudnn_enabled


def test_sdpa_route_leaves_sdpas_default_order_installed_on_a_first_cuda_call(monkeypatch):
    """torch installs SDPA's default priority order on CUDA lazily, at a process's first dispatch
    (cuDNN first on recent GPUs, over a static flash, efficient, math, cuDNN). When flexflash's SDPA
    route makes that first call, the order it restores afterwards is torch's installed default, not
    the static order read before it: the caller's own SDPA calls rank cuDNN first as they would have
    without flexflash (an H100 and an H200 ran masked grouped-head steps on math after such a call).
    torch's lazy installation is emulated here (no GPU); tests/test_gpu.py checks it on a GPU."""
    import types

    from torch.nn.attention import SDPBackend

    from flexflash import _sdpa, _torch_private
    static = [int(b) for b in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH,
                               SDPBackend.CUDNN_ATTENTION, SDPBackend.OVERRIDEABLE)]
    default = static[3:4] + static[:3] + static[4:]
    state = dict(order=list(static), installed=False, during=None)

    def dispatch():  # what SDPA's CUDA dispatch does first (sdp_utils.cpp priority_order)
        if not state["installed"]:
            state["installed"], state["order"] = True, list(default)

    def choice(*args, **kwargs):
        dispatch()
        return 0

    def sdpa(q, k, v, **kw):
        dispatch()
        state["during"] = list(state["order"])
        return "out"

    monkeypatch.setattr(_torch_private, "sdp_priority_order", lambda: list(state["order"]))
    monkeypatch.setattr(_torch_private, "set_sdp_priority_order", lambda order: state.update(order=list(order)))
    monkeypatch.setattr(torch, "_fused_sdp_choice", choice)
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", sdpa)
    monkeypatch.setattr(_sdpa, "_SETTLED", [False])
    cuda = types.SimpleNamespace(device=torch.device("cuda"))
    assert _sdpa._prioritised(cuda, cuda, cuda, dict(attn_mask=None)) == "out"
    assert state["during"][:3] == default[:3]
    assert state["order"] == default  # not the static order read before the first dispatch
    assert _sdpa._prioritised(cuda, cuda, cuda, dict(attn_mask=None)) == "out" and state["order"] == default


def test_explain_gives_the_path_and_why_each_other_path_was_not_taken():
    """explain() returns the call's plan without running it (nothing compiles): the path, the
    generator and kernel options on the flex path only, and one reason for every other path; the
    call runs exactly that path; explain raises what the call raises."""
    from flexflash.plan import PATHS, Plan
    q, k, v = _qkv(Nq=24, Nk=40)
    pad = torch.rand(1, 40) > 0.3
    compiles = flexflash.compile_stats()["compiles"]
    cases = [
        (dict(), "sdpa", {"flex": "SDPA computes this call exactly and faster"}),
        (dict(mask=pad, causal=True), "flex", {"sdpa": "causal and a mask: SDPA takes one of them"}),
        (dict(backend="reference"), "reference", {"sdpa": "backend='reference'", "flex": "backend='reference'"}),
        (dict(return_lse=True), "memory-bounded", {"flex": "return_lse=True"}),
        (dict(dropout_p=0.2), "memory-bounded", {"flex": "dropout_p=0.2"}),
    ]
    for kwargs, path, why in cases:
        plan = flexflash.explain(q, k, v, **kwargs)
        assert isinstance(plan, Plan) and plan.path == path == route(q, k, v, **kwargs)
        assert set(plan.reasons) == set(PATHS) - {path}, plan.reasons
        assert all(plan.reasons.values())
        for other, text in why.items():
            assert text in plan.reasons[other], (kwargs, plan.reasons)
        assert (plan.generator is not None) == (path == "flex")
        assert path == "flex" or plan.kernel_options is None
        assert f"path: {path}" in str(plan) and all(f"not {p}: " in str(plan) for p in plan.reasons)
    assert flexflash.compile_stats()["compiles"] == compiles  # nothing ran
    kv_grad = _qkv(grad=True)
    plan = flexflash.explain(*kv_grad, causal=True, mask=pad[:, :8])
    assert plan.path == "memory-bounded" and "require grad" in plan.reasons["flex"]
    with torch.no_grad():
        assert flexflash.explain(*kv_grad, causal=True, mask=pad[:, :8]).path == "flex"
    assert flexflash.explain(*_qkv(Nq=0)).reasons["flex"].startswith("an empty problem")
    # the caller's own kernel options are the plan's (a kernel option flexflash chose is there too)
    with torch.no_grad():
        assert flexflash.explain(q, k, v, kernel_options={"BLOCK_M": 16, "BLOCK_N": 16}).kernel_options[
            "BLOCK_M"] == 16
    with pytest.raises(NotImplementedError, match="backend='flex'.*backward"):
        flexflash.explain(*kv_grad, backend="flex")
    with pytest.raises(TypeError, match="explain: unknown keyword"):
        flexflash.explain(q, k, v, is_causal=True)
    with pytest.raises(ValueError, match="mask"):
        flexflash.explain(q, k, v, mask=torch.ones(3, 40, dtype=torch.bool))


@pytest.mark.gpu
def test_explain_on_cuda_names_what_keeps_a_call_off_sdpa(monkeypatch):
    """The SDPA route's reasons on CUDA (the capability set as on an H100/H200)."""
    from flexflash import _tuning
    monkeypatch.setattr(_tuning, "capability", lambda device: (9, 0))
    q = torch.randn(1, 2, 128, 64, device="cuda", dtype=torch.bfloat16)
    assert flexflash.explain(q, q, q, causal=True).path == "sdpa"
    assert flexflash.explain(q, q, q, mask_mod=flexflash.mods.sliding_window(8)).reasons["sdpa"] == "a mask_mod is given"
    assert flexflash.explain(q, q, q, dropout_p=0.1).path == "sdpa"  # SDPA's own dropout
    masked_dropout = flexflash.explain(q, q, q, mask_mod=flexflash.mods.sliding_window(8), dropout_p=0.1)
    assert masked_dropout.path == "flex" and masked_dropout.reasons["sdpa"] == "a mask_mod is given"
    assert "top-left" in flexflash.explain(q[:, :, :64], q, q, causal=True).reasons["sdpa"]
    assert "float16 and bfloat16" in flexflash.explain(q.float(), q.float(), q.float()).reasons["sdpa"]
