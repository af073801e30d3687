"""`akd demo`: the paper's pipeline end to end, orchestrating both sides: teachers trained by the trainer, the teacher
service serving them, students trained against it, their evaluation, and the report.

It depends on `student_trainer` and `teacher_service` (as separate processes, through their command lines, and on the
trainer's config types); neither depends on it.

  plan     the plan as validated data (plans/*.toml are the built-in ones)
  layout   where everything lives in the output folder, and the records kept there across invocations
  jobs     running training and evaluation processes a few at a time, with progress and an ETA
  demo     the stages: teachers, serve, students, evaluate, report
  report   RESULTS.md, results.json and the pictures, from the runs' own files
  cli      `akd demo`
  health   a free port, and waiting for a service to answer /healthz (bench starts its services with it too)
  machine  the machine a result was measured on, recorded beside it (the demo's report, bench's results)
"""


class DemoError(RuntimeError):
    """A stage cannot go on (a job failed, a stage before it has not run); the message says what to do."""
