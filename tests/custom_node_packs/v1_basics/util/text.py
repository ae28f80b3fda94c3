from ..constants import SUFFIX


def shout(text):
    return text.upper() + SUFFIX
