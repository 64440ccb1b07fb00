"""Removes a row's files from storage when the row is deleted, and a double's training folder.

Django leaves files behind on delete; for face photos that would break the promise that
deleting data leaves nothing on disk. The delete runs after the transaction commits, so a
rolled-back delete keeps its files.
"""

from __future__ import annotations

from django.db import models, transaction
from django.db.models.signals import post_delete
from django.dispatch import receiver

from studio import training_folders
from studio.models import Persona


@receiver(post_delete)
def delete_row_files(sender: type[models.Model], instance: models.Model, **kwargs) -> None:
    if sender._meta.app_label != "studio":
        return
    for field in sender._meta.concrete_fields:
        if isinstance(field, models.FileField):
            stored = getattr(instance, field.attname)
            if stored:
                transaction.on_commit(lambda name=stored.name, storage=stored.storage: storage.delete(name))


@receiver(post_delete, sender=Persona)
def delete_training_folder(sender: type[Persona], instance: Persona, **kwargs) -> None:
    """A stopped build's checkpoints on this machine (other workers' go in their next sweep)."""
    transaction.on_commit(lambda persona_id=instance.pk: training_folders.discard(persona_id))
