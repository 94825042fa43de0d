"""What a request does between HTTP and routing, with no HTTP in it: admit it against its
key, answer it from the cache or coalesce it with its twins, hold its idempotency claim,
upscale, and bill. The API layer parses and answers; a batch line's runner calls the same.

  edits.py     EditService: one edit request from parsed inputs to an `Edited` result
  answer.py    `Edited`, its x-upscale header values and metadata, and its JSON body
  estimate.py  the dryRun estimate from a routing plan
"""

from gateway.service.answer import Edited, images_body
from gateway.service.edits import EditInput, EditService, pin_model

__all__ = ["EditInput", "EditService", "Edited", "images_body", "pin_model"]
