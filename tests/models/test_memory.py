"""models.memory: the allocator-peak replay and the saved-for-backward byte count, on allocations whose
sizes are known by construction."""
import torch

from models.memory import CpuPeakBytes, saved_tensor_bytes, storage_bytes


def test_cpu_peak_bytes_replays_the_allocator():
    with CpuPeakBytes(base=100) as memory:
        a = torch.ones(1000)                        # 4000 bytes
        view = a[10:]                               # no allocation
        b = torch.mul(a, a)                         # 4000: the peak, 8000 above the start
        del a, b
        c = torch.zeros(250, dtype=torch.float64)   # 2000, while view keeps a's 4000 alive
        x = torch.randn(100, requires_grad=True)    # 400
        (x.exp() * c[:100].float()).sum().backward()  # small transients and x.grad
    assert memory.peak == 100 + 8000, memory.peak
    del view
    with CpuPeakBytes() as memory:
        torch.empty(3, 1000)
    assert memory.peak == 12000


def test_saved_tensor_bytes_counts_each_storage_once():
    x = torch.randn(10, 20, requires_grad=True)       # 800 bytes
    assert saved_tensor_bytes(lambda t: (t * t).sum(), x) == 800  # x saved twice, one storage
    assert saved_tensor_bytes(lambda t: t.exp(), x) == 800         # exp saves its result
    assert saved_tensor_bytes(lambda t: t + 1, x) == 0             # add saves nothing
    w = torch.randn(20, 5, requires_grad=True)      # 400 bytes
    assert saved_tensor_bytes(torch.mm, x, w) == 800 + 400          # both operands
    assert storage_bytes(x, x[1:], x.t(), w) == 1200
