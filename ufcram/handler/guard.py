"""Failures the handler lives through: an error that comes back every batch is said once
per client, then counted, so that the log shows what went wrong and how often, not a flood.
"""
MOST_KEPT = 4096   # distinct messages counted at once; past that they are only logged


class Repeats:
    """Counts of (client, message). The first occurrence is logged at WARNING (with its
    traceback if asked); later ones only at each power of two, with the running count,
    and the total once the client leaves (forget)."""

    def __init__(self, log):
        self.log = log
        self.seen = {}

    def warn(self, client, message, exc_info=False):
        """Say message about client (None: the node itself) unless it is a repeat;
        returns how many times it has been seen."""
        key = (client, message)
        count = self.seen.get(key, 0) + 1
        if count > 1 or len(self.seen) < MOST_KEPT:
            self.seen[key] = count
        if count == 1:
            self.log.warning("%s: %s", self.who(client), message, exc_info=exc_info)
        elif count & (count - 1) == 0:
            self.log.warning("%s: %s (%d times so far)", self.who(client), message, count)
        return count

    def forget(self, client):
        """The client has left: the totals not said yet, and its keys go."""
        for key in [k for k in self.seen if k[0] is client]:
            count = self.seen.pop(key)
            if count & (count - 1):   # not a power of two: its last count is unsaid
                self.log.warning("%s: %s (%d times in all)", self.who(client), key[1], count)

    @staticmethod
    def who(client):
        return "node" if client is None else f"client pid {client.pid}"
