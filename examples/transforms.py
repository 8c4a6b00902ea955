"""Example record transforms: plug one in without touching the library.

A transform is any function `fn(record: dict) -> dict | None`. It runs on every record of a source
after the record is read (a JSON line, a Parquet/Arrow row, a JSON array element, `{"text": ...}`
for text files) and before it is tokenized. Return a record in a format posttrain trains on
(`messages`, `conversations`, `instruction`/`output`, `prompt`/`completion`, `text`), or None to
filter the record out (counted as `filtered`). An exception inside it is a bad record: with
`data.on_bad_record: error` the job stops with one line naming the transform, the source and the
record (`file:line`); with `skip` it is counted under `transform`.

Set it on one source (`transform:` on the source), or for every source without its own
(`data.transform`):

```yaml
data:
  sources:
    - {path: data/dolly.jsonl, transform: examples/transforms.py:dolly_to_messages}   # databricks-dolly-15k
    - {path: data/chats.jsonl}                                                       # already `messages`
```

A file path (`path/to/file.py:fn`) is looked up next to the job file, then in the current
directory; so is a module (`my_transforms:fn`, `pkg.module:fn`), with no PYTHONPATH to set.
"""

from __future__ import annotations


def dolly_to_messages(rec: dict) -> dict | None:
    """databricks-dolly-15k (`instruction`, `context`, `response`, `category`) -> a chat.

    The context, when there is one, is given to the model before the instruction; records without a
    response are dropped."""
    response = (rec.get("response") or "").strip()
    if not response:
        return None
    context = (rec.get("context") or "").strip()
    prompt = f"{context}\n\n{rec['instruction']}" if context else rec["instruction"]
    return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]}
