from django import template
from django.utils.translation import gettext as _
from django.utils.translation import gettext_lazy

from studio import services
from studio.models import Job

register = template.Library()

# The pipeline's stage names, as a person reads them.
STAGES = {
    "preprocess": gettext_lazy("Preparing photos"),
    "train": gettext_lazy("Training"),
    "validate": gettext_lazy("Checking the likeness"),
    "fuse": gettext_lazy("Finishing"),
    "portrait": gettext_lazy("Rendering portraits"),
}


@register.simple_tag
def job_state(job: Job) -> str:
    """Where a job stands in words: its place in the queue, or its stage, and an ETA."""
    position = services.queue_position(job)
    eta = services.estimated_seconds(job)
    if position is not None:
        text = _("Waiting: %(count)d ahead of you.") % {"count": position}
    else:
        text = str(STAGES.get(job.stage, _("Working")))
    if eta is not None:
        text += " " + _("About %(minutes)d min left.") % {"minutes": max(1, round(eta / 60))}
    return text
