"""Jobs: handler work that waits on something outside it (an agent's reply to a command
of a demotion, a client's events read before an ioctl can go through), written as a
generator that yields what it waits for; the one loop advances it, a part of the
Handler class (loop.py). Nothing a job does calls back up into the loop.
"""
import logging
import select

from ufcram.errors import HandlerError
from .wakeup import poll_spinning

log = logging.getLogger("ufcram.handler")
POLLIN = select.POLLIN | select.POLLHUP | select.POLLERR


class AgentReply:
    """A job's wait for the reply of client's agent to the command it has just sent;
    the job is sent the reply, (status, bytes), or thrown HandlerError."""
    __slots__ = ("client",)

    def __init__(self, client):
        self.client = client


class EventsRead:
    """A job's wait for client's uffd to be read: an ioctl met EAGAIN, which the kernel
    answers while an event is unread. The loop serves the uffd at once and goes on."""
    __slots__ = ("client",)

    def __init__(self, client):
        self.client = client


class Job:
    def __init__(self, steps, done):
        self.steps = steps     # the generator
        self.done = done       # done(result, error) once it has ended, or None
        self.keeper = None     # the client whose agent it waits on
        self.poller = None     # that agent's socket and every uffd


class Jobs:
    """The part of the Handler (loop.py) that runs jobs, one at a time. While one waits
    on an agent, the loop serves uffds only: the agent itself may fault, its drop waits
    until we read the REMOVE event it causes, and no thread of any application may wait
    on a demotion. Requests and policy wait for the job's end."""

    def start(self, steps, done=None):
        """Run steps (a generator) until its first wait on an agent, or to its end."""
        assert self.job is None, "one job at a time"
        self.job = Job(steps, done)
        self.advance()

    def advance(self, reply=None, error=None):
        job = self.job
        while True:
            try:
                wait = job.steps.throw(error) if error is not None else job.steps.send(reply)
            except StopIteration as stop:
                return self.end(stop.value, None)
            except Exception as e:
                return self.end(None, e)
            reply = error = None
            if isinstance(wait, EventsRead):
                self.drain_uffd(wait.client)
                continue
            job.keeper = wait.client
            job.poller = select.poll()
            job.poller.register(wait.client.agent.fileno(), POLLIN)
            for fd in self.by_uffd:
                job.poller.register(fd, POLLIN)
            # the faults that the step just done held back (pages it had in flight)
            self.resolve_deferred()
            return

    def end(self, result, error):
        job, self.job = self.job, None
        self.resolve_deferred()
        if job.done is not None:
            job.done(result, error)
        elif error is not None:   # a bug of ours: said, and the loop goes on
            self.repeats.warn(None, f"handler work failed unexpectedly: {error!r}",
                              exc_info=error)

    def wait_on_job(self):
        """One wait of the job on its agent's reply, serving every uffd meanwhile."""
        job = self.job
        agent = job.keeper.agent
        if agent is None or agent.fileno() < 0:
            return self.advance(error=HandlerError(f"the agent of pid {job.keeper.pid} "
                                                   "has gone"))
        events = poll_spinning(job.poller, self.spin, self.agent_timeout_ms)
        if not events:
            return self.advance(error=HandlerError(f"agent of pid {job.keeper.pid} did not "
                                                   "answer in time"))
        for fd, _ in events:
            if fd == agent.fileno():
                try:
                    reply = agent.recv()
                except (HandlerError, OSError) as e:   # ECONNRESET: its process exited
                    return self.advance(error=e)
                return self.advance(reply)
            if fd in self.by_uffd:
                self.drain_uffd(self.by_uffd[fd])
