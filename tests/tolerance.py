"""The one tolerance rule (FlashAttention's): our error against the float64 reference is at most twice the error
of torch's own implementation in the same dtype, plus a small floor."""
import torch

# Absolute floors, relative to the reference's largest magnitude (at least 1). float32's is ~80 ulps: attention
# gradients cancel (dS = P * (dP - rowsum(dO * O))), so a single ill-conditioned element can be off by a few
# ulps-times-condition in any correct fp32 kernel while torch happens to land closer on that one element
# (seen: an fp32 dK entry 5.5e-6 off on the Triton backend, torch 1.0e-6, replayed with FA_TEST_SEED=2215651293).
FLOOR = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def assert_close(ours: torch.Tensor, torch_same_dtype: torch.Tensor, reference: torch.Tensor, name: str = "output",
                 floor: float | None = None) -> None:
    """ours and torch_same_dtype in the dtype under test; reference computed in float64."""
    assert ours.shape == reference.shape, f"{name}: shape {tuple(ours.shape)}, expected {tuple(reference.shape)}"
    ours, base, ref = ours.double().cpu(), torch_same_dtype.double().cpu(), reference.double().cpu()
    finite = torch.isfinite(ref)
    assert torch.equal(torch.isfinite(ours), finite), f"{name}: non-finite values where the reference is finite " \
                                                       f"(or the reverse)"
    if not finite.any():
        return
    ours, base, ref = ours[finite], base[finite], ref[finite]
    err = (ours - ref).abs().max().item()
    # torch's error where torch gives a number: a NaN of a fused torch kernel (a fully masked row, say) must not
    # switch the comparison off for every other element
    base_finite = torch.isfinite(base)
    torch_err = (base - ref)[base_finite].abs().max().item() if base_finite.any() else float("inf")
    if floor is None:
        floor = FLOOR[torch_same_dtype.dtype] * max(1.0, ref.abs().max().item())
    assert err <= 2 * torch_err + floor, (f"{name}: max error {err:.3g} > 2 x torch's {torch_err:.3g} + "
                                          f"floor {floor:.3g}")
