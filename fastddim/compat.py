"""Private or version-specific APIs of torch, Triton and diffusers, each behind one small function."""

# ---------------------------------------------------------------------------------------------- scheduler (issue 11)


def tensor_version(tensor: object) -> int | None:
    """``Tensor._version``: the counter every in-place change of a tensor (or of a view of it) increments.

    The schedulers compare it to notice ``scheduler.alphas_cumprod`` changed in place. None for non-tensors (and
    should torch ever drop the attribute, which would make in-place changes go unnoticed, not break anything).
    """
    # Called on every step: one getattr (non-tensors have no such attribute).
    return getattr(tensor, "_version", None)
