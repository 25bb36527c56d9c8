class StudyError(ValueError):
    """A study cannot run as written. The message names the field and says what to do."""
