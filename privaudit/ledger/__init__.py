"""The ledger: its event vocabulary (:mod:`.events`), the hash-chained write-ahead log
(:mod:`.ledger`) and durable writes (:mod:`.durable`). What a run *spends*, recorded before each release."""
