# Print an optspec for argparse to handle cmd's options that are independent of any subcommand.
function __fish_tope_ota_global_optspecs
    string join \n state-dir= versions-dir= report-url= systemctl= reboot-cmd= gui= inhibit-dir= keys-dir= inhibit-cmd= health-cmd= health-deadline= health-timeout= health-interval= migrate-timeout= lock-wait= json v/verbose q/quiet h/help V/version
end

function __fish_tope_ota_needs_command
    # Figure out if the current invocation already has a command.
    set -l cmd (commandline -opc)
    set -e cmd[1]
    argparse -s (__fish_tope_ota_global_optspecs) -- $cmd 2>/dev/null
    or return
    if set -q argv[1]
        # Also print the command, so this can be used to figure out what it is.
        echo $argv[1]
        return 1
    end
    return 0
end

function __fish_tope_ota_using_subcommand
    set -l cmd (__fish_tope_ota_needs_command)
    test -z "$cmd"
    and return 1
    contains -- $cmd[1] $argv
end

complete -c tope-ota -n "__fish_tope_ota_needs_command" -l state-dir -d 'Directory of state.json, its lock and downloads/' -r -F
complete -c tope-ota -n "__fish_tope_ota_needs_command" -l versions-dir -d 'Root of the version snapshots and the current/previous/factory symlinks' -r -F
complete -c tope-ota -n "__fish_tope_ota_needs_command" -l report-url -d 'Where progress callbacks are POSTed; an empty string disables them' -r
complete -c tope-ota -n "__fish_tope_ota_needs_command" -l systemctl -d 'Service manager command, called as `CMD stop|start|is-active NAME`' -r
complete -c tope-ota -n "__fish_tope_ota_needs_command" -l reboot-cmd -d 'Command that reboots the device' -r
complete -c tope-ota -n "__fish_tope_ota_needs_command" -l gui -d 'Progress screen launched during install, when it exists' -r -F
complete -c tope-ota -n "__fish_tope_ota_needs_command" -l inhibit-dir -d 'Directory where the printer\'s software drops a file while it prints: install and rollback wait until it is empty' -r -F
complete -c tope-ota -n "__fish_tope_ota_needs_command" -l keys-dir -d 'Trusted minisign public keys (*.pub); with at least one, packages must be signed' -r -F
complete -c tope-ota -n "__fish_tope_ota_needs_command" -l inhibit-cmd -d 'Command whose non-zero exit also inhibits install and rollback' -r
complete -c tope-ota -n "__fish_tope_ota_needs_command" -l health-cmd -d 'Device-wide health check, run from the new snapshot after its services started, before a version is committed: exit 0 means healthy (split on whitespace, no shell)' -r
complete -c tope-ota -n "__fish_tope_ota_needs_command" -l health-deadline -d 'Health checks are retried in rounds until one passes or this long has passed (500ms, 60s, 2min, 1h); a run started before then has its full --health-timeout' -r
complete -c tope-ota -n "__fish_tope_ota_needs_command" -l health-timeout -d 'Each run of a health check is killed, with its process group, after this long' -r
complete -c tope-ota -n "__fish_tope_ota_needs_command" -l health-interval -d 'Pause between rounds of health checks' -r
complete -c tope-ota -n "__fish_tope_ota_needs_command" -l migrate-timeout -d 'A package\'s migrate command is killed, with its process group, after this long' -r
complete -c tope-ota -n "__fish_tope_ota_needs_command" -l lock-wait -d 'A writer that finds the lock held by a brief pass (heal with nothing to do, a command finishing) waits this long for it, then says BUSY; an operation in flight (a download, an install) is BUSY at once. 0 never waits' -r
complete -c tope-ota -n "__fish_tope_ota_needs_command" -l json -d 'Print one JSON object on stdout instead of human text'
complete -c tope-ota -n "__fish_tope_ota_needs_command" -s v -l verbose -d 'More log output (repeat for debug)'
complete -c tope-ota -n "__fish_tope_ota_needs_command" -s q -l quiet -d 'Only errors on stderr, no progress bar'
complete -c tope-ota -n "__fish_tope_ota_needs_command" -s h -l help -d 'Print help'
complete -c tope-ota -n "__fish_tope_ota_needs_command" -s V -l version -d 'Print version'
complete -c tope-ota -n "__fish_tope_ota_needs_command" -f -a "download" -d 'Download and verify an update package, resuming a partial one'
complete -c tope-ota -n "__fish_tope_ota_needs_command" -f -a "install" -d 'Install the downloaded package as a new version snapshot'
complete -c tope-ota -n "__fish_tope_ota_needs_command" -f -a "status" -d 'Show the operation in flight and the installed versions'
complete -c tope-ota -n "__fish_tope_ota_needs_command" -f -a "rollback" -d 'Switch back to the previous, the factory or a named version'
complete -c tope-ota -n "__fish_tope_ota_needs_command" -f -a "heal" -d 'Finish or undo whatever an interruption left (run at boot and by a timer)'
complete -c tope-ota -n "__fish_tope_ota_needs_command" -f -a "serve" -d 'Serve the HTTP API of device-api on loopback'
complete -c tope-ota -n "__fish_tope_ota_needs_command" -f -a "pack" -d 'Build an update package (ZIP with manifest.json) from a directory'
complete -c tope-ota -n "__fish_tope_ota_needs_command" -f -a "factory" -d 'Make the factory snapshot: a private, read-only copy of current (once per device)'
complete -c tope-ota -n "__fish_tope_ota_needs_command" -f -a "verify" -d 'Compare snapshots with what was installed; exit 1 on any difference'
complete -c tope-ota -n "__fish_tope_ota_needs_command" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c tope-ota -n "__fish_tope_ota_using_subcommand download" -l version -d 'Version of the package, [0-9A-Za-z._+-]{1,64}' -r
complete -c tope-ota -n "__fish_tope_ota_using_subcommand download" -l url -d 'http(s) URL of the package' -r
complete -c tope-ota -n "__fish_tope_ota_using_subcommand download" -l name -d 'File name the package is stored under in downloads/' -r
complete -c tope-ota -n "__fish_tope_ota_using_subcommand download" -l size -d 'Size of the package in bytes' -r
complete -c tope-ota -n "__fish_tope_ota_using_subcommand download" -l md5 -d 'MD5 of the package, 32 hex digits' -r
complete -c tope-ota -n "__fish_tope_ota_using_subcommand download" -l sha256 -d 'SHA-256 of the package, 64 hex digits (optional; checked beside the MD5)' -r
complete -c tope-ota -n "__fish_tope_ota_using_subcommand download" -l sig-url -d 'URL of the package\'s minisign signature (default: the package URL + .minisig)' -r
complete -c tope-ota -n "__fish_tope_ota_using_subcommand download" -l request -d 'The API\'s JSON request body, from FILE or `-` for stdin' -r
complete -c tope-ota -n "__fish_tope_ota_using_subcommand download" -l state-dir -d 'Directory of state.json, its lock and downloads/' -r -F
complete -c tope-ota -n "__fish_tope_ota_using_subcommand download" -l versions-dir -d 'Root of the version snapshots and the current/previous/factory symlinks' -r -F
complete -c tope-ota -n "__fish_tope_ota_using_subcommand download" -l report-url -d 'Where progress callbacks are POSTed; an empty string disables them' -r
complete -c tope-ota -n "__fish_tope_ota_using_subcommand download" -l systemctl -d 'Service manager command, called as `CMD stop|start|is-active NAME`' -r
complete -c tope-ota -n "__fish_tope_ota_using_subcommand download" -l reboot-cmd -d 'Command that reboots the device' -r
complete -c tope-ota -n "__fish_tope_ota_using_subcommand download" -l gui -d 'Progress screen launched during install, when it exists' -r -F
complete -c tope-ota -n "__fish_tope_ota_using_subcommand download" -l inhibit-dir -d 'Directory where the printer\'s software drops a file while it prints: install and rollback wait until it is empty' -r -F
complete -c tope-ota -n "__fish_tope_ota_using_subcommand download" -l keys-dir -d 'Trusted minisign public keys (*.pub); with at least one, packages must be signed' -r -F
complete -c tope-ota -n "__fish_tope_ota_using_subcommand download" -l inhibit-cmd -d 'Command whose non-zero exit also inhibits install and rollback' -r
complete -c tope-ota -n "__fish_tope_ota_using_subcommand download" -l health-cmd -d 'Device-wide health check, run from the new snapshot after its services started, before a version is committed: exit 0 means healthy (split on whitespace, no shell)' -r
complete -c tope-ota -n "__fish_tope_ota_using_subcommand download" -l health-deadline -d 'Health checks are retried in rounds until one passes or this long has passed (500ms, 60s, 2min, 1h); a run started before then has its full --health-timeout' -r
complete -c tope-ota -n "__fish_tope_ota_using_subcommand download" -l health-timeout -d 'Each run of a health check is killed, with its process group, after this long' -r
complete -c tope-ota -n "__fish_tope_ota_using_subcommand download" -l health-interval -d 'Pause between rounds of health checks' -r
complete -c tope-ota -n "__fish_tope_ota_using_subcommand download" -l migrate-timeout -d 'A package\'s migrate command is killed, with its process group, after this long' -r
complete -c tope-ota -n "__fish_tope_ota_using_subcommand download" -l lock-wait -d 'A writer that finds the lock held by a brief pass (heal with nothing to do, a command finishing) waits this long for it, then says BUSY; an operation in flight (a download, an install) is BUSY at once. 0 never waits' -r
complete -c tope-ota -n "__fish_tope_ota_using_subcommand download" -l full -d 'Download the whole package: no delta from the files of current'
complete -c tope-ota -n "__fish_tope_ota_using_subcommand download" -l json -d 'Print one JSON object on stdout instead of human text'
complete -c tope-ota -n "__fish_tope_ota_using_subcommand download" -s v -l verbose -d 'More log output (repeat for debug)'
complete -c tope-ota -n "__fish_tope_ota_using_subcommand download" -s q -l quiet -d 'Only errors on stderr, no progress bar'
complete -c tope-ota -n "__fish_tope_ota_using_subcommand download" -s h -l help -d 'Print help'
complete -c tope-ota -n "__fish_tope_ota_using_subcommand install" -l version -d 'Version to install; must be the downloaded one' -r
complete -c tope-ota -n "__fish_tope_ota_using_subcommand install" -l wait -d 'Wait up to SECS for inhibitors (print jobs) to clear instead of refusing at once' -r
complete -c tope-ota -n "__fish_tope_ota_using_subcommand install" -l state-dir -d 'Directory of state.json, its lock and downloads/' -r -F
complete -c tope-ota -n "__fish_tope_ota_using_subcommand install" -l versions-dir -d 'Root of the version snapshots and the current/previous/factory symlinks' -r -F
complete -c tope-ota -n "__fish_tope_ota_using_subcommand install" -l report-url -d 'Where progress callbacks are POSTed; an empty string disables them' -r
complete -c tope-ota -n "__fish_tope_ota_using_subcommand install" -l systemctl -d 'Service manager command, called as `CMD stop|start|is-active NAME`' -r
complete -c tope-ota -n "__fish_tope_ota_using_subcommand install" -l reboot-cmd -d 'Command that reboots the device' -r
complete -c tope-ota -n "__fish_tope_ota_using_subcommand install" -l gui -d 'Progress screen launched during install, when it exists' -r -F
complete -c tope-ota -n "__fish_tope_ota_using_subcommand install" -l inhibit-dir -d 'Directory where the printer\'s software drops a file while it prints: install and rollback wait until it is empty' -r -F
complete -c tope-ota -n "__fish_tope_ota_using_subcommand install" -l keys-dir -d 'Trusted minisign public keys (*.pub); with at least one, packages must be signed' -r -F
complete -c tope-ota -n "__fish_tope_ota_using_subcommand install" -l inhibit-cmd -d 'Command whose non-zero exit also inhibits install and rollback' -r
complete -c tope-ota -n "__fish_tope_ota_using_subcommand install" -l health-cmd -d 'Device-wide health check, run from the new snapshot after its services started, before a version is committed: exit 0 means healthy (split on whitespace, no shell)' -r
complete -c tope-ota -n "__fish_tope_ota_using_subcommand install" -l health-deadline -d 'Health checks are retried in rounds until one passes or this long has passed (500ms, 60s, 2min, 1h); a run started before then has its full --health-timeout' -r
complete -c tope-ota -n "__fish_tope_ota_using_subcommand install" -l health-timeout -d 'Each run of a health check is killed, with its process group, after this long' -r
complete -c tope-ota -n "__fish_tope_ota_using_subcommand install" -l health-interval -d 'Pause between rounds of health checks' -r
complete -c tope-ota -n "__fish_tope_ota_using_subcommand install" -l migrate-timeout -d 'A package\'s migrate command is killed, with its process group, after this long' -r
complete -c tope-ota -n "__fish_tope_ota_using_subcommand install" -l lock-wait -d 'A writer that finds the lock held by a brief pass (heal with nothing to do, a command finishing) waits this long for it, then says BUSY; an operation in flight (a download, an install) is BUSY at once. 0 never waits' -r
complete -c tope-ota -n "__fish_tope_ota_using_subcommand install" -l allow-downgrade -d 'Install even if the version is lower than the current one'
complete -c tope-ota -n "__fish_tope_ota_using_subcommand install" -l reinstall -d 'Install the version current already runs again: a fresh snapshot (current mirrored, every module from the package) under a new dir name. Without it, that install succeeds with nothing to do'
complete -c tope-ota -n "__fish_tope_ota_using_subcommand install" -l json -d 'Print one JSON object on stdout instead of human text'
complete -c tope-ota -n "__fish_tope_ota_using_subcommand install" -s v -l verbose -d 'More log output (repeat for debug)'
complete -c tope-ota -n "__fish_tope_ota_using_subcommand install" -s q -l quiet -d 'Only errors on stderr, no progress bar'
complete -c tope-ota -n "__fish_tope_ota_using_subcommand install" -s h -l help -d 'Print help'
complete -c tope-ota -n "__fish_tope_ota_using_subcommand status" -l state-dir -d 'Directory of state.json, its lock and downloads/' -r -F
complete -c tope-ota -n "__fish_tope_ota_using_subcommand status" -l versions-dir -d 'Root of the version snapshots and the current/previous/factory symlinks' -r -F
complete -c tope-ota -n "__fish_tope_ota_using_subcommand status" -l report-url -d 'Where progress callbacks are POSTed; an empty string disables them' -r
complete -c tope-ota -n "__fish_tope_ota_using_subcommand status" -l systemctl -d 'Service manager command, called as `CMD stop|start|is-active NAME`' -r
complete -c tope-ota -n "__fish_tope_ota_using_subcommand status" -l reboot-cmd -d 'Command that reboots the device' -r
complete -c tope-ota -n "__fish_tope_ota_using_subcommand status" -l gui -d 'Progress screen launched during install, when it exists' -r -F
complete -c tope-ota -n "__fish_tope_ota_using_subcommand status" -l inhibit-dir -d 'Directory where the printer\'s software drops a file while it prints: install and rollback wait until it is empty' -r -F
complete -c tope-ota -n "__fish_tope_ota_using_subcommand status" -l keys-dir -d 'Trusted minisign public keys (*.pub); with at least one, packages must be signed' -r -F
complete -c tope-ota -n "__fish_tope_ota_using_subcommand status" -l inhibit-cmd -d 'Command whose non-zero exit also inhibits install and rollback' -r
complete -c tope-ota -n "__fish_tope_ota_using_subcommand status" -l health-cmd -d 'Device-wide health check, run from the new snapshot after its services started, before a version is committed: exit 0 means healthy (split on whitespace, no shell)' -r
complete -c tope-ota -n "__fish_tope_ota_using_subcommand status" -l health-deadline -d 'Health checks are retried in rounds until one passes or this long has passed (500ms, 60s, 2min, 1h); a run started before then has its full --health-timeout' -r
complete -c tope-ota -n "__fish_tope_ota_using_subcommand status" -l health-timeout -d 'Each run of a health check is killed, with its process group, after this long' -r
complete -c tope-ota -n "__fish_tope_ota_using_subcommand status" -l health-interval -d 'Pause between rounds of health checks' -r
complete -c tope-ota -n "__fish_tope_ota_using_subcommand status" -l migrate-timeout -d 'A package\'s migrate command is killed, with its process group, after this long' -r
complete -c tope-ota -n "__fish_tope_ota_using_subcommand status" -l lock-wait -d 'A writer that finds the lock held by a brief pass (heal with nothing to do, a command finishing) waits this long for it, then says BUSY; an operation in flight (a download, an install) is BUSY at once. 0 never waits' -r
complete -c tope-ota -n "__fish_tope_ota_using_subcommand status" -l json -d 'Print one JSON object on stdout instead of human text'
complete -c tope-ota -n "__fish_tope_ota_using_subcommand status" -s v -l verbose -d 'More log output (repeat for debug)'
complete -c tope-ota -n "__fish_tope_ota_using_subcommand status" -s q -l quiet -d 'Only errors on stderr, no progress bar'
complete -c tope-ota -n "__fish_tope_ota_using_subcommand status" -s h -l help -d 'Print help'
complete -c tope-ota -n "__fish_tope_ota_using_subcommand rollback" -l wait -d 'Wait up to SECS for inhibitors (print jobs) to clear instead of refusing at once' -r
complete -c tope-ota -n "__fish_tope_ota_using_subcommand rollback" -l to -d 'previous, factory or a version' -r
complete -c tope-ota -n "__fish_tope_ota_using_subcommand rollback" -l state-dir -d 'Directory of state.json, its lock and downloads/' -r -F
complete -c tope-ota -n "__fish_tope_ota_using_subcommand rollback" -l versions-dir -d 'Root of the version snapshots and the current/previous/factory symlinks' -r -F
complete -c tope-ota -n "__fish_tope_ota_using_subcommand rollback" -l report-url -d 'Where progress callbacks are POSTed; an empty string disables them' -r
complete -c tope-ota -n "__fish_tope_ota_using_subcommand rollback" -l systemctl -d 'Service manager command, called as `CMD stop|start|is-active NAME`' -r
complete -c tope-ota -n "__fish_tope_ota_using_subcommand rollback" -l reboot-cmd -d 'Command that reboots the device' -r
complete -c tope-ota -n "__fish_tope_ota_using_subcommand rollback" -l gui -d 'Progress screen launched during install, when it exists' -r -F
complete -c tope-ota -n "__fish_tope_ota_using_subcommand rollback" -l inhibit-dir -d 'Directory where the printer\'s software drops a file while it prints: install and rollback wait until it is empty' -r -F
complete -c tope-ota -n "__fish_tope_ota_using_subcommand rollback" -l keys-dir -d 'Trusted minisign public keys (*.pub); with at least one, packages must be signed' -r -F
complete -c tope-ota -n "__fish_tope_ota_using_subcommand rollback" -l inhibit-cmd -d 'Command whose non-zero exit also inhibits install and rollback' -r
complete -c tope-ota -n "__fish_tope_ota_using_subcommand rollback" -l health-cmd -d 'Device-wide health check, run from the new snapshot after its services started, before a version is committed: exit 0 means healthy (split on whitespace, no shell)' -r
complete -c tope-ota -n "__fish_tope_ota_using_subcommand rollback" -l health-deadline -d 'Health checks are retried in rounds until one passes or this long has passed (500ms, 60s, 2min, 1h); a run started before then has its full --health-timeout' -r
complete -c tope-ota -n "__fish_tope_ota_using_subcommand rollback" -l health-timeout -d 'Each run of a health check is killed, with its process group, after this long' -r
complete -c tope-ota -n "__fish_tope_ota_using_subcommand rollback" -l health-interval -d 'Pause between rounds of health checks' -r
complete -c tope-ota -n "__fish_tope_ota_using_subcommand rollback" -l migrate-timeout -d 'A package\'s migrate command is killed, with its process group, after this long' -r
complete -c tope-ota -n "__fish_tope_ota_using_subcommand rollback" -l lock-wait -d 'A writer that finds the lock held by a brief pass (heal with nothing to do, a command finishing) waits this long for it, then says BUSY; an operation in flight (a download, an install) is BUSY at once. 0 never waits' -r
complete -c tope-ota -n "__fish_tope_ota_using_subcommand rollback" -l json -d 'Print one JSON object on stdout instead of human text'
complete -c tope-ota -n "__fish_tope_ota_using_subcommand rollback" -s v -l verbose -d 'More log output (repeat for debug)'
complete -c tope-ota -n "__fish_tope_ota_using_subcommand rollback" -s q -l quiet -d 'Only errors on stderr, no progress bar'
complete -c tope-ota -n "__fish_tope_ota_using_subcommand rollback" -s h -l help -d 'Print help'
complete -c tope-ota -n "__fish_tope_ota_using_subcommand heal" -l state-dir -d 'Directory of state.json, its lock and downloads/' -r -F
complete -c tope-ota -n "__fish_tope_ota_using_subcommand heal" -l versions-dir -d 'Root of the version snapshots and the current/previous/factory symlinks' -r -F
complete -c tope-ota -n "__fish_tope_ota_using_subcommand heal" -l report-url -d 'Where progress callbacks are POSTed; an empty string disables them' -r
complete -c tope-ota -n "__fish_tope_ota_using_subcommand heal" -l systemctl -d 'Service manager command, called as `CMD stop|start|is-active NAME`' -r
complete -c tope-ota -n "__fish_tope_ota_using_subcommand heal" -l reboot-cmd -d 'Command that reboots the device' -r
complete -c tope-ota -n "__fish_tope_ota_using_subcommand heal" -l gui -d 'Progress screen launched during install, when it exists' -r -F
complete -c tope-ota -n "__fish_tope_ota_using_subcommand heal" -l inhibit-dir -d 'Directory where the printer\'s software drops a file while it prints: install and rollback wait until it is empty' -r -F
complete -c tope-ota -n "__fish_tope_ota_using_subcommand heal" -l keys-dir -d 'Trusted minisign public keys (*.pub); with at least one, packages must be signed' -r -F
complete -c tope-ota -n "__fish_tope_ota_using_subcommand heal" -l inhibit-cmd -d 'Command whose non-zero exit also inhibits install and rollback' -r
complete -c tope-ota -n "__fish_tope_ota_using_subcommand heal" -l health-cmd -d 'Device-wide health check, run from the new snapshot after its services started, before a version is committed: exit 0 means healthy (split on whitespace, no shell)' -r
complete -c tope-ota -n "__fish_tope_ota_using_subcommand heal" -l health-deadline -d 'Health checks are retried in rounds until one passes or this long has passed (500ms, 60s, 2min, 1h); a run started before then has its full --health-timeout' -r
complete -c tope-ota -n "__fish_tope_ota_using_subcommand heal" -l health-timeout -d 'Each run of a health check is killed, with its process group, after this long' -r
complete -c tope-ota -n "__fish_tope_ota_using_subcommand heal" -l health-interval -d 'Pause between rounds of health checks' -r
complete -c tope-ota -n "__fish_tope_ota_using_subcommand heal" -l migrate-timeout -d 'A package\'s migrate command is killed, with its process group, after this long' -r
complete -c tope-ota -n "__fish_tope_ota_using_subcommand heal" -l lock-wait -d 'A writer that finds the lock held by a brief pass (heal with nothing to do, a command finishing) waits this long for it, then says BUSY; an operation in flight (a download, an install) is BUSY at once. 0 never waits' -r
complete -c tope-ota -n "__fish_tope_ota_using_subcommand heal" -l auto-install -d 'Also install a pending package once no print job inhibits it'
complete -c tope-ota -n "__fish_tope_ota_using_subcommand heal" -l json -d 'Print one JSON object on stdout instead of human text'
complete -c tope-ota -n "__fish_tope_ota_using_subcommand heal" -s v -l verbose -d 'More log output (repeat for debug)'
complete -c tope-ota -n "__fish_tope_ota_using_subcommand heal" -s q -l quiet -d 'Only errors on stderr, no progress bar'
complete -c tope-ota -n "__fish_tope_ota_using_subcommand heal" -s h -l help -d 'Print help'
complete -c tope-ota -n "__fish_tope_ota_using_subcommand serve" -l listen -d 'Address to listen on (loopback unless the operator says otherwise)' -r
complete -c tope-ota -n "__fish_tope_ota_using_subcommand serve" -l state-dir -d 'Directory of state.json, its lock and downloads/' -r -F
complete -c tope-ota -n "__fish_tope_ota_using_subcommand serve" -l versions-dir -d 'Root of the version snapshots and the current/previous/factory symlinks' -r -F
complete -c tope-ota -n "__fish_tope_ota_using_subcommand serve" -l report-url -d 'Where progress callbacks are POSTed; an empty string disables them' -r
complete -c tope-ota -n "__fish_tope_ota_using_subcommand serve" -l systemctl -d 'Service manager command, called as `CMD stop|start|is-active NAME`' -r
complete -c tope-ota -n "__fish_tope_ota_using_subcommand serve" -l reboot-cmd -d 'Command that reboots the device' -r
complete -c tope-ota -n "__fish_tope_ota_using_subcommand serve" -l gui -d 'Progress screen launched during install, when it exists' -r -F
complete -c tope-ota -n "__fish_tope_ota_using_subcommand serve" -l inhibit-dir -d 'Directory where the printer\'s software drops a file while it prints: install and rollback wait until it is empty' -r -F
complete -c tope-ota -n "__fish_tope_ota_using_subcommand serve" -l keys-dir -d 'Trusted minisign public keys (*.pub); with at least one, packages must be signed' -r -F
complete -c tope-ota -n "__fish_tope_ota_using_subcommand serve" -l inhibit-cmd -d 'Command whose non-zero exit also inhibits install and rollback' -r
complete -c tope-ota -n "__fish_tope_ota_using_subcommand serve" -l health-cmd -d 'Device-wide health check, run from the new snapshot after its services started, before a version is committed: exit 0 means healthy (split on whitespace, no shell)' -r
complete -c tope-ota -n "__fish_tope_ota_using_subcommand serve" -l health-deadline -d 'Health checks are retried in rounds until one passes or this long has passed (500ms, 60s, 2min, 1h); a run started before then has its full --health-timeout' -r
complete -c tope-ota -n "__fish_tope_ota_using_subcommand serve" -l health-timeout -d 'Each run of a health check is killed, with its process group, after this long' -r
complete -c tope-ota -n "__fish_tope_ota_using_subcommand serve" -l health-interval -d 'Pause between rounds of health checks' -r
complete -c tope-ota -n "__fish_tope_ota_using_subcommand serve" -l migrate-timeout -d 'A package\'s migrate command is killed, with its process group, after this long' -r
complete -c tope-ota -n "__fish_tope_ota_using_subcommand serve" -l lock-wait -d 'A writer that finds the lock held by a brief pass (heal with nothing to do, a command finishing) waits this long for it, then says BUSY; an operation in flight (a download, an install) is BUSY at once. 0 never waits' -r
complete -c tope-ota -n "__fish_tope_ota_using_subcommand serve" -l api-allow-downgrade -d 'Honour `"allow_downgrade": true` in POST /update; without it the field is ignored (logged) and a lower version is refused with DOWNGRADE_REFUSED'
complete -c tope-ota -n "__fish_tope_ota_using_subcommand serve" -l json -d 'Print one JSON object on stdout instead of human text'
complete -c tope-ota -n "__fish_tope_ota_using_subcommand serve" -s v -l verbose -d 'More log output (repeat for debug)'
complete -c tope-ota -n "__fish_tope_ota_using_subcommand serve" -s q -l quiet -d 'Only errors on stderr, no progress bar'
complete -c tope-ota -n "__fish_tope_ota_using_subcommand serve" -s h -l help -d 'Print help'
complete -c tope-ota -n "__fish_tope_ota_using_subcommand pack" -l version -d 'Version the package installs' -r
complete -c tope-ota -n "__fish_tope_ota_using_subcommand pack" -l manifest -d 'manifest.json to use (default: DIR/manifest.json, else one module per top-level entry)' -r -F
complete -c tope-ota -n "__fish_tope_ota_using_subcommand pack" -l out -d 'Where to write the package' -r -F
complete -c tope-ota -n "__fish_tope_ota_using_subcommand pack" -l state-dir -d 'Directory of state.json, its lock and downloads/' -r -F
complete -c tope-ota -n "__fish_tope_ota_using_subcommand pack" -l versions-dir -d 'Root of the version snapshots and the current/previous/factory symlinks' -r -F
complete -c tope-ota -n "__fish_tope_ota_using_subcommand pack" -l report-url -d 'Where progress callbacks are POSTed; an empty string disables them' -r
complete -c tope-ota -n "__fish_tope_ota_using_subcommand pack" -l systemctl -d 'Service manager command, called as `CMD stop|start|is-active NAME`' -r
complete -c tope-ota -n "__fish_tope_ota_using_subcommand pack" -l reboot-cmd -d 'Command that reboots the device' -r
complete -c tope-ota -n "__fish_tope_ota_using_subcommand pack" -l gui -d 'Progress screen launched during install, when it exists' -r -F
complete -c tope-ota -n "__fish_tope_ota_using_subcommand pack" -l inhibit-dir -d 'Directory where the printer\'s software drops a file while it prints: install and rollback wait until it is empty' -r -F
complete -c tope-ota -n "__fish_tope_ota_using_subcommand pack" -l keys-dir -d 'Trusted minisign public keys (*.pub); with at least one, packages must be signed' -r -F
complete -c tope-ota -n "__fish_tope_ota_using_subcommand pack" -l inhibit-cmd -d 'Command whose non-zero exit also inhibits install and rollback' -r
complete -c tope-ota -n "__fish_tope_ota_using_subcommand pack" -l health-cmd -d 'Device-wide health check, run from the new snapshot after its services started, before a version is committed: exit 0 means healthy (split on whitespace, no shell)' -r
complete -c tope-ota -n "__fish_tope_ota_using_subcommand pack" -l health-deadline -d 'Health checks are retried in rounds until one passes or this long has passed (500ms, 60s, 2min, 1h); a run started before then has its full --health-timeout' -r
complete -c tope-ota -n "__fish_tope_ota_using_subcommand pack" -l health-timeout -d 'Each run of a health check is killed, with its process group, after this long' -r
complete -c tope-ota -n "__fish_tope_ota_using_subcommand pack" -l health-interval -d 'Pause between rounds of health checks' -r
complete -c tope-ota -n "__fish_tope_ota_using_subcommand pack" -l migrate-timeout -d 'A package\'s migrate command is killed, with its process group, after this long' -r
complete -c tope-ota -n "__fish_tope_ota_using_subcommand pack" -l lock-wait -d 'A writer that finds the lock held by a brief pass (heal with nothing to do, a command finishing) waits this long for it, then says BUSY; an operation in flight (a download, an install) is BUSY at once. 0 never waits' -r
complete -c tope-ota -n "__fish_tope_ota_using_subcommand pack" -l json -d 'Print one JSON object on stdout instead of human text'
complete -c tope-ota -n "__fish_tope_ota_using_subcommand pack" -s v -l verbose -d 'More log output (repeat for debug)'
complete -c tope-ota -n "__fish_tope_ota_using_subcommand pack" -s q -l quiet -d 'Only errors on stderr, no progress bar'
complete -c tope-ota -n "__fish_tope_ota_using_subcommand pack" -s h -l help -d 'Print help'
complete -c tope-ota -n "__fish_tope_ota_using_subcommand factory" -l state-dir -d 'Directory of state.json, its lock and downloads/' -r -F
complete -c tope-ota -n "__fish_tope_ota_using_subcommand factory" -l versions-dir -d 'Root of the version snapshots and the current/previous/factory symlinks' -r -F
complete -c tope-ota -n "__fish_tope_ota_using_subcommand factory" -l report-url -d 'Where progress callbacks are POSTed; an empty string disables them' -r
complete -c tope-ota -n "__fish_tope_ota_using_subcommand factory" -l systemctl -d 'Service manager command, called as `CMD stop|start|is-active NAME`' -r
complete -c tope-ota -n "__fish_tope_ota_using_subcommand factory" -l reboot-cmd -d 'Command that reboots the device' -r
complete -c tope-ota -n "__fish_tope_ota_using_subcommand factory" -l gui -d 'Progress screen launched during install, when it exists' -r -F
complete -c tope-ota -n "__fish_tope_ota_using_subcommand factory" -l inhibit-dir -d 'Directory where the printer\'s software drops a file while it prints: install and rollback wait until it is empty' -r -F
complete -c tope-ota -n "__fish_tope_ota_using_subcommand factory" -l keys-dir -d 'Trusted minisign public keys (*.pub); with at least one, packages must be signed' -r -F
complete -c tope-ota -n "__fish_tope_ota_using_subcommand factory" -l inhibit-cmd -d 'Command whose non-zero exit also inhibits install and rollback' -r
complete -c tope-ota -n "__fish_tope_ota_using_subcommand factory" -l health-cmd -d 'Device-wide health check, run from the new snapshot after its services started, before a version is committed: exit 0 means healthy (split on whitespace, no shell)' -r
complete -c tope-ota -n "__fish_tope_ota_using_subcommand factory" -l health-deadline -d 'Health checks are retried in rounds until one passes or this long has passed (500ms, 60s, 2min, 1h); a run started before then has its full --health-timeout' -r
complete -c tope-ota -n "__fish_tope_ota_using_subcommand factory" -l health-timeout -d 'Each run of a health check is killed, with its process group, after this long' -r
complete -c tope-ota -n "__fish_tope_ota_using_subcommand factory" -l health-interval -d 'Pause between rounds of health checks' -r
complete -c tope-ota -n "__fish_tope_ota_using_subcommand factory" -l migrate-timeout -d 'A package\'s migrate command is killed, with its process group, after this long' -r
complete -c tope-ota -n "__fish_tope_ota_using_subcommand factory" -l lock-wait -d 'A writer that finds the lock held by a brief pass (heal with nothing to do, a command finishing) waits this long for it, then says BUSY; an operation in flight (a download, an install) is BUSY at once. 0 never waits' -r
complete -c tope-ota -n "__fish_tope_ota_using_subcommand factory" -l json -d 'Print one JSON object on stdout instead of human text'
complete -c tope-ota -n "__fish_tope_ota_using_subcommand factory" -s v -l verbose -d 'More log output (repeat for debug)'
complete -c tope-ota -n "__fish_tope_ota_using_subcommand factory" -s q -l quiet -d 'Only errors on stderr, no progress bar'
complete -c tope-ota -n "__fish_tope_ota_using_subcommand factory" -s h -l help -d 'Print help'
complete -c tope-ota -n "__fish_tope_ota_using_subcommand verify" -l state-dir -d 'Directory of state.json, its lock and downloads/' -r -F
complete -c tope-ota -n "__fish_tope_ota_using_subcommand verify" -l versions-dir -d 'Root of the version snapshots and the current/previous/factory symlinks' -r -F
complete -c tope-ota -n "__fish_tope_ota_using_subcommand verify" -l report-url -d 'Where progress callbacks are POSTed; an empty string disables them' -r
complete -c tope-ota -n "__fish_tope_ota_using_subcommand verify" -l systemctl -d 'Service manager command, called as `CMD stop|start|is-active NAME`' -r
complete -c tope-ota -n "__fish_tope_ota_using_subcommand verify" -l reboot-cmd -d 'Command that reboots the device' -r
complete -c tope-ota -n "__fish_tope_ota_using_subcommand verify" -l gui -d 'Progress screen launched during install, when it exists' -r -F
complete -c tope-ota -n "__fish_tope_ota_using_subcommand verify" -l inhibit-dir -d 'Directory where the printer\'s software drops a file while it prints: install and rollback wait until it is empty' -r -F
complete -c tope-ota -n "__fish_tope_ota_using_subcommand verify" -l keys-dir -d 'Trusted minisign public keys (*.pub); with at least one, packages must be signed' -r -F
complete -c tope-ota -n "__fish_tope_ota_using_subcommand verify" -l inhibit-cmd -d 'Command whose non-zero exit also inhibits install and rollback' -r
complete -c tope-ota -n "__fish_tope_ota_using_subcommand verify" -l health-cmd -d 'Device-wide health check, run from the new snapshot after its services started, before a version is committed: exit 0 means healthy (split on whitespace, no shell)' -r
complete -c tope-ota -n "__fish_tope_ota_using_subcommand verify" -l health-deadline -d 'Health checks are retried in rounds until one passes or this long has passed (500ms, 60s, 2min, 1h); a run started before then has its full --health-timeout' -r
complete -c tope-ota -n "__fish_tope_ota_using_subcommand verify" -l health-timeout -d 'Each run of a health check is killed, with its process group, after this long' -r
complete -c tope-ota -n "__fish_tope_ota_using_subcommand verify" -l health-interval -d 'Pause between rounds of health checks' -r
complete -c tope-ota -n "__fish_tope_ota_using_subcommand verify" -l migrate-timeout -d 'A package\'s migrate command is killed, with its process group, after this long' -r
complete -c tope-ota -n "__fish_tope_ota_using_subcommand verify" -l lock-wait -d 'A writer that finds the lock held by a brief pass (heal with nothing to do, a command finishing) waits this long for it, then says BUSY; an operation in flight (a download, an install) is BUSY at once. 0 never waits' -r
complete -c tope-ota -n "__fish_tope_ota_using_subcommand verify" -l all -d 'Check every snapshot in the versions root'
complete -c tope-ota -n "__fish_tope_ota_using_subcommand verify" -l json -d 'Print one JSON object on stdout instead of human text'
complete -c tope-ota -n "__fish_tope_ota_using_subcommand verify" -s v -l verbose -d 'More log output (repeat for debug)'
complete -c tope-ota -n "__fish_tope_ota_using_subcommand verify" -s q -l quiet -d 'Only errors on stderr, no progress bar'
complete -c tope-ota -n "__fish_tope_ota_using_subcommand verify" -s h -l help -d 'Print help'
complete -c tope-ota -n "__fish_tope_ota_using_subcommand help; and not __fish_seen_subcommand_from download install status rollback heal serve pack factory verify help" -f -a "download" -d 'Download and verify an update package, resuming a partial one'
complete -c tope-ota -n "__fish_tope_ota_using_subcommand help; and not __fish_seen_subcommand_from download install status rollback heal serve pack factory verify help" -f -a "install" -d 'Install the downloaded package as a new version snapshot'
complete -c tope-ota -n "__fish_tope_ota_using_subcommand help; and not __fish_seen_subcommand_from download install status rollback heal serve pack factory verify help" -f -a "status" -d 'Show the operation in flight and the installed versions'
complete -c tope-ota -n "__fish_tope_ota_using_subcommand help; and not __fish_seen_subcommand_from download install status rollback heal serve pack factory verify help" -f -a "rollback" -d 'Switch back to the previous, the factory or a named version'
complete -c tope-ota -n "__fish_tope_ota_using_subcommand help; and not __fish_seen_subcommand_from download install status rollback heal serve pack factory verify help" -f -a "heal" -d 'Finish or undo whatever an interruption left (run at boot and by a timer)'
complete -c tope-ota -n "__fish_tope_ota_using_subcommand help; and not __fish_seen_subcommand_from download install status rollback heal serve pack factory verify help" -f -a "serve" -d 'Serve the HTTP API of device-api on loopback'
complete -c tope-ota -n "__fish_tope_ota_using_subcommand help; and not __fish_seen_subcommand_from download install status rollback heal serve pack factory verify help" -f -a "pack" -d 'Build an update package (ZIP with manifest.json) from a directory'
complete -c tope-ota -n "__fish_tope_ota_using_subcommand help; and not __fish_seen_subcommand_from download install status rollback heal serve pack factory verify help" -f -a "factory" -d 'Make the factory snapshot: a private, read-only copy of current (once per device)'
complete -c tope-ota -n "__fish_tope_ota_using_subcommand help; and not __fish_seen_subcommand_from download install status rollback heal serve pack factory verify help" -f -a "verify" -d 'Compare snapshots with what was installed; exit 1 on any difference'
complete -c tope-ota -n "__fish_tope_ota_using_subcommand help; and not __fish_seen_subcommand_from download install status rollback heal serve pack factory verify help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
