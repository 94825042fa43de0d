"""The Batch API: JSONL files of /v1/images/edits requests run in the background on every
replica, each line through the same service as a live request, with signed webhooks.

  model.py           a batch and a file as kept, and in OpenAI's shapes
  store.py           the records and line-queue protocols
  redis_backend.py   both on Redis (hashes, Streams with a consumer group, leases)
  memory_backend.py  both in one process without Redis (records written through to disk)
  jsonl.py           an input file's lines found and checked
  line.py            one line through EditService to its output line
  worker.py          validation, the lines' concurrency bounds, reclaim, finalization
  webhooks.py        Standard Webhooks signing and delivery
  service.py         the Files and Batches operations the routes call
  build.py           the parts wired for a deployment
"""
