"""Low-rank factorization: each target ``nn.Linear`` (out x in) becomes two smaller ones,
in -> r -> out (:class:`.module.LowRankLinear`), by plain truncated SVD (``svd``) or
activation-aware SVD (``asvd``). Math in :mod:`.svd_math`, glue in :mod:`.lowrank`.
"""
