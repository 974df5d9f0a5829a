"""Long-context evaluation on the model itself: validation loss and synthetic recall, at any
parallel layout, during training and on any checkpoint.

Place in the import order: tools -> convert -> training -> evaluation -> data -> model -> config.
This package is given a model (megatron-core model chunks) and megatron-core's
forward_backward_func and knows nothing of optimizers, checkpoints or the loop; the training loop
calls it (training/periodic_eval.py) and tools/evaluate.py composes training's checkpoint
loading with it. It reads data (packing, held-out rows, tokenizers, the chat template) and model
(CP splitting, PackedSeqParams).

- tasks.py       json_kv (HELMET) and niah_mk (RULER) examples at an exact token length and depth,
                 plain or Llama-3 chat template; text.py: the offline haystack text
- scoring.py     one-pass scoring: gold log-probability and argmax at the answer positions,
                 vocabulary-parallel (= greedy decoding's exact match)
- forward.py     forward-only passes through the pipeline schedule on packed THD rows, and the
                 reduction that gives every rank the same numbers
- validation.py  loss per domain and by position bucket on held-out rows
- recall.py      examples through the model, per-example scores, summaries
- session.py     one evaluation and its files; report.py: console, JSON, TensorBoard scalars;
                 plots.py: PNG heatmap and history (matplotlib, optional)
- hf_reference.py  the same scoring through Hugging Face transformers (the reference)
"""
