from django import forms
from django.contrib.auth.forms import PasswordResetForm, UserCreationForm
from django.contrib.auth.models import User
from django.utils.translation import gettext_lazy as _
from django.utils.translation import gettext, ngettext

from pipeline.generate import TemplateRefused
from studio.models import Persona, Template
from studio.uploads import RefusedFile, clean_photo


class SignupForm(UserCreationForm):
    """Username, e-mail (for password resets) and the password twice, with Django's validators.

    An e-mail address already in use is accepted without a word: refusing it would tell anyone
    who tries an address whether its owner has an account here (and so photos of their face),
    and would let anyone claim a stranger's address first, since nothing confirms it. A reset
    for a shared address reaches every account with it, each mail naming its username.
    """

    email = forms.EmailField(label=_("E-mail"), help_text=_("Used only to reset your password."))

    class Meta(UserCreationForm.Meta):
        model = User
        fields = ["username", "email"]
        # Django's own words said "English letters only" in Chinese, yet 小明 is a valid name.
        help_texts = {"username": _("Up to 150 characters: letters of any alphabet, digits and @ . + - _, no spaces.")}
        error_messages = {
            "username": {"invalid": _("Use only letters of any alphabet, digits and @ . + - _ in your username, no spaces.")}
        }


class ResetByEmailForm(PasswordResetForm):
    """Django's reset form, its field named as the page and the sign-up form name it."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.fields["email"].label = _("E-mail")


class PersonaForm(forms.ModelForm):
    class Meta:
        model = Persona
        fields = ["name"]
        labels = {"name": _("Name of your digital double")}
        error_messages = {
            "name": {"max_length": _("Please keep the name to %(limit_value)d characters (it has %(show_value)d).")}
        }


class MultipleFileInput(forms.ClearableFileInput):
    allow_multiple_selected = True


class MultipleFileField(forms.FileField):
    """Django's documented pattern: a FileField whose clean() returns a list of files."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("widget", MultipleFileInput(attrs={"accept": "image/*", "multiple": True}))
        # An empty file is refused on its own (studio.uploads), not with the whole batch.
        kwargs.setdefault("allow_empty_file", True)
        super().__init__(*args, **kwargs)

    def clean(self, data, initial=None) -> list:
        single_file_clean = super().clean
        if isinstance(data, (list, tuple)):
            return [single_file_clean(item, initial) for item in data]
        return [single_file_clean(data, initial)]


class PhotoUploadForm(forms.Form):
    """Selfies for one digital double; the count is checked here, each file in studio.uploads."""

    photos = MultipleFileField(label=_("Photos"))

    def __init__(self, *args, room: int, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.room = room
        # upload.js refuses a larger choice before sending it: past DATA_UPLOAD_MAX_NUMBER_FILES
        # Django answers the request with a bare 400 before this form sees it.
        self.fields["photos"].widget.attrs.update(
            {
                "data-room": room,
                "data-too-many": ngettext(
                    "You can add %(count)d more photo to this double. Please choose fewer.",
                    "You can add %(count)d more photos to this double. Please choose fewer.",
                    room,
                )
                % {"count": room},
            }
        )

    def clean_photos(self) -> list:
        photos = self.cleaned_data["photos"]
        if len(photos) > self.room:
            raise forms.ValidationError(
                ngettext(
                    "You can add %(count)d more photo to this double; you sent %(sent)d.",
                    "You can add %(count)d more photos to this double; you sent %(sent)d.",
                    self.room,
                )
                % {"count": self.room, "sent": len(photos)}
            )
        return photos

    def photo_names(self) -> list[str]:
        """Each photo's name on the person's device, for display only.

        upload.js sends the files under short safe names, since Django's multipart parser refuses
        a whole request for one long file name (500 Chinese characters) and drops a file whose
        name is unprintable, and sends their own names in `names`, one per file. Without those,
        the names the files came with.
        """
        photos = self.cleaned_data["photos"]
        sent = self.data.getlist("names")
        return sent if len(sent) == len(photos) else [photo.name or "" for photo in photos]


class SentenceLabels(forms.Form):
    """Checkbox labels here are whole sentences: no ":" after them ("我同意…。:" read badly)."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("label_suffix", "")
        super().__init__(*args, **kwargs)


class FaceConsentForm(SentenceLabels):
    agree = forms.BooleanField(
        label=_("I agree that Photobooth processes my face to build my digital double."),
        error_messages={"required": _("Please tick the box to agree, or leave this page.")},
    )


class TemplateForm(forms.ModelForm):
    """Staff upload of a portrait template: the image is re-encoded and must show a usable face."""

    class Meta:
        model = Template
        fields = ["title", "title_zh_hans", "image", "prompt", "negative_prompt", "tags", "published"]
        # The words studio.uploads uses for the same files, not Django's (whose Chinese says "您").
        error_messages = {
            "image": {
                "invalid_image": _("This file is not a photo we can read, or it is damaged."),
                "empty": _("This file is empty."),
            }
        }

    def clean_image(self):
        from studio import services  # services imports this module's models; import when used

        upload = self.cleaned_data["image"]
        try:
            self.cleaned_jpeg = clean_photo(upload)
        except RefusedFile as refused:
            raise forms.ValidationError(refused.message) from None
        try:
            self.face_boxes = services.template_face_boxes(self.cleaned_jpeg)
        except TemplateRefused as refused:
            raise forms.ValidationError(gettext(str(refused))) from None
        return upload


class DeleteDataForm(SentenceLabels):
    confirm = forms.BooleanField(
        label=_("I understand that my photos, digital doubles and portraits are deleted for good."),
        error_messages={"required": _("Tick the box to confirm.")},
    )
    delete_account = forms.BooleanField(label=_("Delete my account too."), required=False)
