"""The data pipeline, one way: file -> records -> role-tagged text -> token ids -> batches.

    files.read_conversations(path, fields=FieldMap(...)) -> [Conversation]  (DataError "file:line: ...")
        (record formats: formats.py; CSV/TSV/XLSX tables: tables.py)
    prompts.prompt_format_for(tokenizer).segments(conv) -> [Segment(text, is_target)]
    tokenization.tokenize_dataset(convs, fmt, tok, max_length) -> [Example(input_ids, labels)], stats
    batch_plan.BatchPlan(examples, batch_size, pad_id, seed=..., pack=...).batches(epoch, start)
        (each batch padded into tensors by collate.py)
    cache.open_or_build(path, tok, fmt, ...)    -> the tokenised examples, memory-mapped
    hub_data.data_sources("ORG/NAME", ...)      -> selection.DataSelection (a hub dataset's split:
        files, --data-filter, --data-limit), which open_or_build takes in place of a path

Nothing here knows about models. Names are re-exported for convenience.
"""

from .batch_plan import BatchPlan, batches_for_epoch, pack_examples, split_train_val
from .collate import Batch, collate, collate_packed
from .files import read_conversations
from .formats import (FORMATS, Conversation, DataError, FieldMap, Turn, conversations_from_records, detect_format,
                      split_human_assistant)
from .prompts import (EOS, INSTRUCT_TEMPLATE, ChatTemplateFormat, PromptFormat, Segment,
                      TemplateFormat, prompt_format_for)
from .tokenization import (IGNORE_INDEX, Example, TokenizeStats, bos_ids, encode_prompt, tokenize_dataset,
                           tokenize_segments)

__all__ = [
    "IGNORE_INDEX", "Batch", "BatchPlan", "Example", "TokenizeStats", "batches_for_epoch", "bos_ids",
    "collate", "collate_packed", "encode_prompt", "pack_examples", "split_train_val",
    "tokenize_dataset", "tokenize_segments",
    "FORMATS", "Conversation", "DataError", "FieldMap", "Turn", "conversations_from_records", "detect_format",
    "read_conversations", "split_human_assistant",
    "EOS", "INSTRUCT_TEMPLATE", "ChatTemplateFormat", "PromptFormat", "Segment", "TemplateFormat",
    "prompt_format_for",
]
