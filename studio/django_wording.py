"""Our own Chinese for a few of Django's strings.

Our catalogue (LOCALE_PATHS) is searched before Django's, so a msgid translated there replaces
Django's translation on every page. makemessages keeps only the msgids it finds in our code:
these are listed here for it. Nothing imports this module.
"""

from django.utils.translation import gettext_noop

DJANGO_STRINGS_WE_TRANSLATE = (
    gettext_noop(":"),  # the label suffix: "用户名：" takes the full-width colon; Django's has none
    gettext_noop("Enter a valid email address."),  # Django's Chinese: "输入一个有效的 Email 地址。"
)
