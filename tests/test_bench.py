import torch

from hierdino.bench.step import Traffic


def test_traffic_counts_the_bytes_of_memory_bound_operations_by_hand():
    x, w = torch.randn(1000, 64), torch.randn(64, 32)
    with Traffic(on_last_dim=64) as t:
        y = x * 2           # reads x, writes y: 2 x 256,000 bytes
        x.view(64, 1000)    # a view: nothing moved
        z = y @ w           # a matrix product: compute-bound, not counted
        y.add_(1)           # in place: reads and writes y
        z.sum()             # reads z (128,000 bytes), writes 4 bytes
    assert t.bytes == 2 * 256_000 + 2 * 256_000 + 128_000 + 4
    assert t.bytes_on_last_dim == 4 * 256_000  # the operations on [*, 64] tensors
