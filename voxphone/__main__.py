from voxphone.cli import main

raise SystemExit(main())
