"""CloudWatch Logs as an EventBridge target, with integer timestamps.

When a rule delivers to a log group (amiflow's hub audit trail, read by ``amictl trace``), moto
stamps the log event with ``unix_time_millis()``, a float such as ``1796153866930.857``. AWS's
timestamps are integer milliseconds, and the AWS SDK for Rust refuses the float in
``FilterLogEvents`` / ``GetLogEvents`` replies (an "unhandled error" while deserializing). This
module makes every stored log event's timestamp and ingestion time whole milliseconds.
"""


def apply():
    from moto.logs import models

    original = models.LogEvent.__init__
    if getattr(original, "_amiflow_logs", False):
        return

    def __init__(self, ingestion_time, log_event):
        log_event = dict(log_event)
        log_event["timestamp"] = int(log_event["timestamp"])
        original(self, int(ingestion_time), log_event)

    __init__._amiflow_logs = True
    models.LogEvent.__init__ = __init__
