import torch

from hierdino.bench.step import Traffic


def test_traffic_counts_the_bytes_of_memory_bound_operations_by_hand():
    x, w, v = torch.randn(1000, 64), torch.randn(64, 32), torch.ones(32, 1)
    with Traffic(on_last_dim=64) as t:
        y = x * 2           # reads x, writes y: 2 x 256,000 bytes
        x.view(64, 1000)    # a view: nothing moved
        z = y @ w           # a matrix product: compute-bound, not counted
        y.add_(1)           # in place: reads and writes y
        z.sum()             # reads z (128,000 bytes), writes 4 bytes
        y.new_ones(10)      # a factory: writes 40 bytes (y only gives dtype and device)
        z @ v               # a matrix-vector product: memory-bound, reads z and the vector, writes 4,000 bytes
    assert t.bytes == 2 * 256_000 + 2 * 256_000 + 128_000 + 4 + 40 + (128_000 + 128 + 4_000)
    assert t.bytes_on_last_dim == 4 * 256_000  # the operations on [*, 64] tensors
