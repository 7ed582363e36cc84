"""Weight formats, below the kernels that run them: the quantized-weight record
(:mod:`.quantized`) and the packed-layout rules (:mod:`.layout`, no torch).

Nothing is imported here, so reading the torch-free layout rules loads no torch.
"""
