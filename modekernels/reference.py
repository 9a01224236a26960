"""Plain reference implementations shared by the tests and the benchmark's verify step.

Nothing here calls a modekernels kernel: the Philox generator is written again with NumPy's
wrapping uint64 arithmetic, and the layers are expressed with ordinary torch operations.
"""
import numpy as np
import torch

_M0, _M1 = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)
_W0, _W1 = 0x9E3779B9, 0xBB67AE85
_LO = np.uint64(0xFFFFFFFF)
_32 = np.uint64(32)


def philox4x32_10(counter, key):
    """Philox4x32-10 on arrays: counter is 4 arrays of uint32 words, key a pair of ints.

    Returns the 4 output words as uint64 arrays holding 32-bit values.
    """
    c0, c1, c2, c3 = (np.asarray(c, dtype=np.uint64) & _LO for c in counter)
    k0, k1 = int(key[0]) & 0xFFFFFFFF, int(key[1]) & 0xFFFFFFFF
    for _ in range(10):
        p0 = _M0 * c0
        p1 = _M1 * c2
        c0, c1, c2, c3 = ((p1 >> _32) ^ c1 ^ np.uint64(k0), p1 & _LO,
                          (p0 >> _32) ^ c3 ^ np.uint64(k1), p0 & _LO)
        k0 = (k0 + _W0) & 0xFFFFFFFF
        k1 = (k1 + _W1) & 0xFFFFFFFF
    return c0, c1, c2, c3


def keep_threshold(p):
    """Integer threshold below which a 32-bit word keeps its element (see csrc/dropout/dropout.h)."""
    return min(int(np.floor((1.0 - p) * 2.0**32)), 0xFFFFFFFF)


def dropout_keep_mask(numel, seed, offset, p, start=0):
    """The keep mask (bool, memory order) of the dropout stream for (seed, offset), of its
    elements start <= i < start + numel; start a multiple of 4."""
    seed, offset = int(seed) & (2**64 - 1), int(offset) & (2**64 - 1)
    groups = np.arange(start // 4, (start + numel + 3) // 4, dtype=np.uint64)
    block = offset // 4
    words = philox4x32_10(
        (np.full_like(groups, block & 0xFFFFFFFF), np.full_like(groups, block >> 32),
         groups & _LO, groups >> _32),
        (seed & 0xFFFFFFFF, seed >> 32))
    bits = np.stack(words, axis=1).reshape(-1)[:numel]
    return torch.from_numpy(bits < np.uint64(keep_threshold(p)))


def opmath_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def keep_scale(p, dtype, device):
    """The factor of a kept element of a `dtype` tensor on `device`, in its opmath dtype: 1 / (1 - p)
    as torch forms it, the keep probability in opmath divided there; torch's CPU dropout then holds
    it in the tensor's dtype (its mask is a tensor of that dtype), its CUDA kernel in opmath."""
    opmath = opmath_dtype(dtype)
    scale = 1 / torch.tensor(1.0 - p, dtype=opmath) if p < 1 else torch.zeros((), dtype=opmath)
    if torch.device(device).type == "cpu":
        scale = scale.to(dtype).to(opmath)
    return scale.to(device)


def dropout(x, p, rng_state):
    """Dropout of x with the mask of rng_state = (seed, offset), computed as modekernels defines it.

    The mask is laid over x's memory order, so x must be non-overlapping and dense.
    """
    seed, offset = (int(v) for v in rng_state.cpu())
    keep = dropout_keep_mask(x.numel(), seed, offset, p)
    # The memory-order view of x: a flat tensor over the same storage.
    flat = x.as_strided((x.numel(),), (1,))
    opmath = opmath_dtype(x.dtype)
    scale = keep_scale(p, x.dtype, x.device)
    mult = torch.where(keep.to(x.device), scale, torch.zeros((), dtype=opmath, device=x.device))
    out = torch.empty_like(x)
    out.as_strided((x.numel(),), (1,)).copy_((flat.to(opmath) * mult).to(x.dtype))
    return out
