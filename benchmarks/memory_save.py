"""Peak memory of one LSTM forward with and without the backward's workspace, in one process:

    python -m benchmarks.memory_save

The same module and input; 'save' is what the functional layer passes when a backward can follow
(grad mode on and an input requiring grad), 'no save' is inference (no_grad).
"""
import torch

import fastrnn

from .harness import peak_memory_bytes


def main():
    for backend in fastrnn.available_backends("cpu"):
        for T, B, H in [(100, 16, 256), (100, 64, 512)]:
            m = fastrnn.LSTM(H, H, backend=backend)
            x = torch.randn(T, B, H)
            xg = x.clone().requires_grad_()

            def infer():
                with torch.no_grad():
                    m(x)

            def train_forward():
                m(xg)

            a, b = peak_memory_bytes(infer) / 2 ** 20, peak_memory_bytes(train_forward) / 2 ** 20
            print(f"{backend:10s} LSTM T{T} B{B} H{H}: forward peak {a:7.2f} MB without save, {b:7.2f} MB with save")


if __name__ == "__main__":
    main()
