"""Triton kernels of fastavts, installed as `fastavts.kernels`.

Each kernel file holds its plain PyTorch reference, the Triton kernels, the launcher and the
autograd function side by side. On a machine without a GPU, set TRITON_INTERPRET=1 before the
kernel module is imported to run the kernels in Triton's interpreter (fp32/fp16 only).
"""
