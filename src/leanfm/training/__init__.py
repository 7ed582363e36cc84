"""Fine-tuning runs and their measurements: ``leanfm tune`` (:mod:`.run`), data-parallel and
federated network cost (:mod:`.ddp`, :mod:`.federated`)."""
