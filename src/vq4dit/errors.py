class UserError(ValueError):
    """Bad input from the user: a one-line message that names the bad value and what would be valid.

    The entry points print it without a traceback and exit with status 2; nothing has been written by then.
    """


def instantiate(cfg, **kwargs):
    """hydra.utils.instantiate that lets our one-line UserError through (Hydra wraps what a target raises)."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate as hydra_instantiate

    try:
        return hydra_instantiate(cfg, **kwargs)
    except InstantiationException as e:
        if isinstance(e.__cause__, UserError):
            raise e.__cause__ from None
        raise
