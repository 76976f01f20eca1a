"""``python -m serving.dimse``: the storage SCP and its forwarder, one supervised process."""

from serving.dimse.service import main

main()
