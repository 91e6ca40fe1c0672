"""Forms of the account, team and key pages: they parse and validate; services act."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from django import forms
from django.contrib.auth import forms as auth_forms
from django.contrib.auth import password_validation
from django.core.validators import RegexValidator

from teams.models import Role, Scope, User

SLUG = RegexValidator(
    r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$", "Lowercase letters, digits and '-', up to 63."
)


class SignInForm(forms.Form):
    # `username`, as Django's own sign-in form and password managers call it; it is the email.
    username = forms.EmailField(max_length=254, label="Email")
    password = forms.CharField(max_length=4096, strip=False, widget=forms.PasswordInput)

    def clean_username(self) -> str:
        return str(self.cleaned_data["username"]).strip().lower()


class CodeForm(forms.Form):
    """A 6-digit code from the authenticator app."""

    code = forms.RegexField(
        regex=r"^\s*[0-9]{3}\s?[0-9]{3}\s*$", error_messages={"invalid": "Enter the 6 digits."}
    )

    def clean_code(self) -> str:
        return str(self.cleaned_data["code"]).replace(" ", "").strip()


class SignUpForm(forms.Form):
    email = forms.EmailField(max_length=254)
    password = forms.CharField(max_length=4096, strip=False, widget=forms.PasswordInput)

    def clean_email(self) -> str:
        email = str(self.cleaned_data["email"]).strip().lower()
        if User.objects.filter(email=email).exists():
            raise forms.ValidationError("There is already an account with this email; sign in instead.")
        return email

    def clean(self) -> dict[str, Any]:
        data = super().clean() or {}
        if "password" in data:
            try:
                password_validation.validate_password(data["password"], User(email=data.get("email", "")))
            except forms.ValidationError as exc:
                self.add_error("password", exc)
        return data


class InviteForm(forms.Form):
    email = forms.EmailField(max_length=254)
    role = forms.ChoiceField(choices=Role.choices, initial=Role.MEMBER)


class RoleForm(forms.Form):
    role = forms.ChoiceField(choices=Role.choices)


class TeamCreateForm(forms.Form):
    slug = forms.CharField(max_length=63, validators=[SLUG])
    name = forms.CharField(max_length=200, required=False)


class ConfirmSlugForm(forms.Form):
    confirm = forms.CharField(max_length=63)


class ApiKeyForm(forms.Form):
    name = forms.CharField(max_length=100, required=False)
    # Like the API: a key is write scope unless it says read.
    scope = forms.ChoiceField(choices=Scope.choices, required=False)
    expires_days = forms.IntegerField(
        min_value=1, max_value=3650, required=False, label="Expires after (days)"
    )

    def clean_scope(self) -> str:
        return str(self.cleaned_data.get("scope") or Scope.WRITE)


class PasswordResetForm(auth_forms.PasswordResetForm):
    """Django's reset form, also for active users who never had a password: accounts that
    operators or `create_api_key` made for an email set their first password this way
    (owning the mailbox is what the reset proves either way)."""

    def get_users(self, email: str) -> Iterator[User]:
        matching = User.objects.filter(email__iexact=email.strip(), is_active=True)
        return (user for user in matching if user.email.lower() == email.strip().lower())
