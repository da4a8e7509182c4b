"""EventBridge extensions: the ``account`` field, and envelopes kept across bus-to-bus forwarding.

* moto builds the event it delivers to a target from
  ``moto.events.utils.EventTemplateParser.DEFAULT_EVENT_INPUT_TEMPLATE``, which has no ``account``
  (its input-paths map already extracts ``$.account``; only the template lacks the slot). So events
  reaching an SQS queue had no ``account``. The template gains ``"account": "<account>"``.
* A bus-to-bus target makes moto call ``put_events`` on the receiving bus with only Source,
  DetailType and Detail, so the forwarded event got a new ``id`` and ``time``, empty ``resources``,
  and the *receiver's* ``account`` and region. AWS keeps the original envelope. Here the forwarding
  call runs with the original envelope in a thread-local, and ``Rule.send_to_targets`` lays it back
  on every event that the receiving bus's rules see, so ``account`` (and ``id``, ``time``,
  ``resources``, ``region``) survive any number of hops. moto delivers synchronously inside the
  ``PutEvents`` request thread, which is what makes the thread-local safe.
"""

from __future__ import annotations

import threading
from typing import Any

_ENVELOPE_KEYS = ("account", "id", "time", "resources", "region")
_forwarding = threading.local()
_orig: dict[str, Any] = {}


def _send_to_targets(self, original_event, transform_input=True):
    carried = getattr(_forwarding, "envelope", None)
    if carried is not None:
        original_event = dict(original_event)
        original_event.update(carried)
    previous = carried
    # While this rule delivers, a bus-to-bus target's put_events (the only nested put_events in
    # send_to_targets) sees this event's envelope.
    _forwarding.envelope = {k: original_event[k] for k in _ENVELOPE_KEYS if k in original_event}
    try:
        return _orig["send_to_targets"](self, original_event, transform_input)
    finally:
        _forwarding.envelope = previous


def apply() -> None:
    from moto.events.models import Rule
    from moto.events.utils import EventTemplateParser

    if _orig:
        return
    template = EventTemplateParser.DEFAULT_EVENT_INPUT_TEMPLATE
    if '"account"' not in template:
        EventTemplateParser.DEFAULT_EVENT_INPUT_TEMPLATE = template.replace(
            '"version": "0", ', '"version": "0", "account": "<account>", ', 1
        )
        assert '"account"' in EventTemplateParser.DEFAULT_EVENT_INPUT_TEMPLATE, "moto's template changed"
    _orig["send_to_targets"] = Rule.send_to_targets
    Rule.send_to_targets = _send_to_targets
