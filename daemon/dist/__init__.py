"""One model across ranks: the link between ranks and the lockstep engine core."""
