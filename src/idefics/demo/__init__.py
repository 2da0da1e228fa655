"""The demo model's world, data, tokenizer and build: a tiny IDEFICS trained from scratch by this package.

- world.py: the rendered scenes (one coloured shape on a plain canvas) and the questions about them
- data.py: scenes to PNG files and a JSONL file of chat rows for `idefics finetune`
- tokenizer.py: a LLaMA-style BPE tokenizer trained with `tokenizers`, with the IDEFICS special tokens
- evaluate.py: exact-answer rate on fresh scenes, through `IdeficsProcessor` and `model.generate`
- eval_sets.py: the world as VQAv2- and COCO-format evaluation sets for `idefics eval` (`make eval-demo`)
- build.py: `python -m idefics.demo`, the whole rebuild (data, tokenizer, `idefics finetune`, check, install)

The shipped model is `idefics.DEMO_MODEL`.
"""
