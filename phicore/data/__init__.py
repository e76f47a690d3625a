"""The data pipeline, one way: file -> records -> role-tagged text -> token ids -> batches.

    formats.read_conversations(path)            -> [Conversation]  (DataError "file:line: ...")
    prompts.prompt_format_for(tokenizer).segments(conv) -> [Segment(text, is_target)]
    collate.tokenize_dataset(convs, fmt, tok, max_length) -> [Example(input_ids, labels)], stats
    collate.BatchPlan(examples, batch_size, pad_id, seed=..., pack=...).batches(epoch, start)

Nothing here knows about models. Names are re-exported for convenience.
"""

from .collate import (IGNORE_INDEX, Batch, BatchPlan, Example, TokenizeStats, batches_for_epoch,
                      bos_ids, collate, collate_packed, encode_prompt, pack_examples,
                      split_train_val, tokenize_dataset, tokenize_segments)
from .formats import (FORMATS, Conversation, DataError, Turn, conversations_from_records,
                      detect_format, read_conversations, split_human_assistant)
from .prompts import (EOS, INSTRUCT_TEMPLATE, ChatTemplateFormat, PromptFormat, Segment,
                      TemplateFormat, prompt_format_for)

__all__ = [
    "IGNORE_INDEX", "Batch", "BatchPlan", "Example", "TokenizeStats", "batches_for_epoch", "bos_ids",
    "collate", "collate_packed", "encode_prompt", "pack_examples", "split_train_val",
    "tokenize_dataset", "tokenize_segments",
    "FORMATS", "Conversation", "DataError", "Turn", "conversations_from_records", "detect_format",
    "read_conversations", "split_human_assistant",
    "EOS", "INSTRUCT_TEMPLATE", "ChatTemplateFormat", "PromptFormat", "Segment", "TemplateFormat",
    "prompt_format_for",
]
