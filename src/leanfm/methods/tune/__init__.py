"""Fine-tuning methods: LoRA, DoRA, QLoRA (peft, bitsandbytes), full fine-tuning, knowledge
distillation and MeZO. Declarations in :mod:`.decl`; the loss and update math in :mod:`.kd` and
:mod:`.mezo` (pure tensor functions); peft glue in :mod:`.adapters`; the loop in :mod:`.loop`."""
