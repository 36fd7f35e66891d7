import sys

from dnn2bnn.cli import main

sys.exit(main())
