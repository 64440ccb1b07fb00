from django import forms
from django.contrib.auth.forms import UserCreationForm
from django.contrib.auth.models import User
from django.utils.translation import gettext_lazy as _

from studio.models import Persona


class SignupForm(UserCreationForm):
    """Username, e-mail (for password resets) and the password twice, with Django's validators."""

    email = forms.EmailField(label=_("E-mail"), help_text=_("Used only to reset your password."))

    class Meta(UserCreationForm.Meta):
        model = User
        fields = ["username", "email"]

    def clean_email(self) -> str:
        email = self.cleaned_data["email"].strip()
        if User.objects.filter(email__iexact=email).exists():
            raise forms.ValidationError(_("An account with this e-mail already exists."))
        return email


class PersonaForm(forms.ModelForm):
    class Meta:
        model = Persona
        fields = ["name"]
        labels = {"name": _("Name of your digital double")}
