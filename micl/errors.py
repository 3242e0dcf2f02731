"""User-facing errors: the CLI prints them on one line and exits with code 2."""


class MiclError(Exception):
    """Bad input from the user (recipe, data, media). The message names the file or key."""


class ConfigError(MiclError):
    pass


class DataError(MiclError):
    pass


class MediaError(DataError):
    def __init__(self, path, reason):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{path}: {reason}")
