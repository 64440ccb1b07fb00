from django import template
from django.utils.translation import gettext as _
from django.utils.translation import ngettext
from django.utils.translation import gettext_lazy

from studio import services
from studio.models import Job

register = template.Library()

# The pipeline's stage names, as a person reads them.
STAGES = {
    "preprocess": gettext_lazy("Preparing photos"),
    "caching": gettext_lazy("Preparing photos"),
    "training": gettext_lazy("Training"),
    "validating": gettext_lazy("Checking the likeness"),
    "fusing": gettext_lazy("Finishing"),
    "portrait": gettext_lazy("Rendering portraits"),
}


@register.simple_tag
def job_state(job: Job) -> str:
    """Where a job stands in words: its place in the queue, or its stage, and an ETA."""
    position = services.queue_position(job)
    eta = services.estimated_seconds(job, position)
    if position is not None:
        text = ngettext("Waiting: %(count)d job ahead of you.", "Waiting: %(count)d jobs ahead of you.", position) % {
            "count": position
        }
    else:
        text = str(STAGES.get(job.stage, _("Working")))
    if eta is not None and eta < 60:
        text += " " + _("Less than a minute left.")  # a portrait takes seconds: "about 1 minute" misled
    elif eta is not None:
        minutes = round(eta / 60)
        text += " " + ngettext("About %(minutes)d minute left.", "About %(minutes)d minutes left.", minutes) % {
            "minutes": minutes
        }
    return text


@register.filter
def can_retry(job: Job) -> bool:
    """Whether a failed job's Retry button shows: trying again would answer it (services.retry_refusal)."""
    return services.retry_refusal(job) is None
