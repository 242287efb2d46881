"""The PowerShell scripts the Hyper-V backend runs, as fixed text with named parameters.

Nothing a caller supplies is ever pasted into script text. Each script starts with a ``param(...)`` block;
values (VM names, paths, checkpoint names) travel beside the text: as typed PSRP parameters remotely, or as
one JSON document on stdin that a constant bridge splats onto the script locally. A name holding quotes,
``;``, ``$()``, backticks or newlines is therefore data and can never become code.

Every script prints one JSON envelope: ``{"ok": true, "data": ...}`` or ``{"ok": false, "error": {...}}``
where the error carries PowerShell's message, FullyQualifiedErrorId, category, exception type and HRESULT,
plus ``kind`` for the failures the scripts detect themselves (module missing, VM or checkpoint not found).

References: HYPERV-NOTES §1 (cmdlets), §2.3 (Msvm_ConcreteJob), §5.2 (command specs), Microsoft's Hyper-V
module reference for Get-VHD, Test-VHD, Merge-VHD, Set-VHD, Get-VM, Get-VMSnapshot, Get-VMHardDiskDrive,
Remove-VMSnapshot.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field

# Shared by every script: strict errors, helper projections, and the envelope. Enums are projected to strings
# and DateTime to ISO-8601 so Windows PowerShell 5.1 and PowerShell 7 produce the same JSON.
_PROLOGUE = r"""
$ErrorActionPreference = 'Stop'
$ProgressPreference = 'SilentlyContinue'

function Stop-Request([string]$Kind, [string]$Message) {
    $exception = [System.InvalidOperationException]::new($Message)
    $exception.Data['VhdxFailureKind'] = $Kind
    throw $exception
}

function Resolve-VhdxVM([string]$Name) {
    $found = @(Hyper-V\Get-VM | Where-Object { $_.Name -eq $Name })
    if ($found.Count -eq 0) { Stop-Request 'VmNotFound' ('no virtual machine is named ' + $Name) }
    if ($found.Count -gt 1) { Stop-Request 'VmAmbiguous' ('several virtual machines are named ' + $Name) }
    return $found[0]
}

function Get-FirstValue($Object, [string[]]$Names) {
    foreach ($n in $Names) {
        $p = $Object.PSObject.Properties[$n]
        if ($p -and $null -ne $p.Value -and "$($p.Value)" -ne '') { return [string]$p.Value }
    }
    return $null
}

function ConvertTo-DriveRecord($Drive) {
    [ordered]@{
        ControllerType = [string]$Drive.ControllerType
        ControllerNumber = $Drive.ControllerNumber
        ControllerLocation = $Drive.ControllerLocation
        Path = $Drive.Path
    }
}

function ConvertTo-VmRecord($VM) {
    [ordered]@{
        Name = $VM.Name
        Id = [string]$VM.Id
        State = [string]$VM.State
        CheckpointType = [string]$VM.CheckpointType
        ParentCheckpointId = (Get-FirstValue $VM @('ParentCheckpointId', 'ParentSnapshotId'))
        Path = $VM.Path
        SnapshotFileLocation = $VM.SnapshotFileLocation
        HardDrives = @(Hyper-V\Get-VMHardDiskDrive -VM $VM | ForEach-Object { ConvertTo-DriveRecord $_ })
    }
}

function ConvertTo-VhdRecord($Vhd) {
    [ordered]@{
        Path = $Vhd.Path
        VhdFormat = [string]$Vhd.VhdFormat
        VhdType = [string]$Vhd.VhdType
        FileSize = $Vhd.FileSize
        Size = $Vhd.Size
        MinimumSize = $Vhd.MinimumSize
        LogicalSectorSize = $Vhd.LogicalSectorSize
        PhysicalSectorSize = $Vhd.PhysicalSectorSize
        BlockSize = $Vhd.BlockSize
        ParentPath = $Vhd.ParentPath
        DiskIdentifier = [string]$Vhd.DiskIdentifier
        FragmentationPercentage = $Vhd.FragmentationPercentage
        Alignment = $Vhd.Alignment
        Attached = $Vhd.Attached
        DiskNumber = $Vhd.DiskNumber
    }
}

function Get-OneVhd([string]$Path) {
    $found = @(Hyper-V\Get-VHD -Path $Path)
    if ($found.Count -ne 1) { Stop-Request 'PathAmbiguous' ('the path matched ' + $found.Count + ' disks: ' + $Path) }
    return $found[0]
}

function Get-VhdChain([string]$LeafPath) {
    $layers = [System.Collections.ArrayList]::new()
    $next = $LeafPath
    while ($next) {
        if ($layers.Count -ge 256) { Stop-Request 'ChainTooDeep' ('chain deeper than 256 layers below ' + $LeafPath) }
        $vhd = Get-OneVhd $next
        [void]$layers.Add((ConvertTo-VhdRecord $vhd))
        $next = $vhd.ParentPath
    }
    return ,$layers.ToArray()
}
"""

_EPILOGUE = r"""
    $envelope = [ordered]@{ ok = $true; data = $result; error = $null }
} catch {
    $record = $_
    $exception = $record.Exception
    $kind = $null
    if ($exception -and $exception.Data -and $exception.Data.Contains('VhdxFailureKind')) {
        $kind = [string]$exception.Data['VhdxFailureKind']
    }
    $envelope = [ordered]@{ ok = $false; data = $null; error = [ordered]@{
        kind = $kind
        message = [string]$exception.Message
        error_id = [string]$record.FullyQualifiedErrorId
        category = [string]$record.CategoryInfo.Category
        exception = $exception.GetType().FullName
        hresult = $exception.HResult
        target = [string]$record.TargetObject
    } }
}
ConvertTo-Json -InputObject $envelope -Depth 10 -Compress
"""

_MODULE_CHECK = r"""
    if (-not (Get-Module -ListAvailable -Name Hyper-V)) {
        Stop-Request 'ModuleMissing' 'the Hyper-V PowerShell module is not installed on this host'
    }
"""


@dataclass(frozen=True)
class Script:
    """One fixed script: ``name`` for messages, its ``param()`` names, whether it changes anything."""

    name: str
    parameters: tuple[str, ...]
    body: str
    mutating: bool = False
    text: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        declared = ", ".join(self.parameters)
        text = f"param({declared})\n{_PROLOGUE}\ntry {{\n{_MODULE_CHECK}\n{self.body.strip(chr(10))}\n{_EPILOGUE}"
        object.__setattr__(self, "text", text)


@dataclass(frozen=True)
class ScriptCall:
    """A script plus the parameter values to bind to its ``param()`` block (``None`` values are left out)."""

    script: Script
    parameters: Mapping[str, object]

    def __post_init__(self) -> None:
        allowed = {p.split("$", 1)[1] for p in self.script.parameters}
        unknown = set(self.parameters) - allowed
        if unknown:
            raise ValueError(f"{self.script.name} has no parameter {sorted(unknown)}")
        bound = {k: v for k, v in self.parameters.items() if v is not None}
        object.__setattr__(self, "parameters", bound)

    def parameters_json(self) -> str:
        return json.dumps(dict(self.parameters), ensure_ascii=False, sort_keys=True)

    def render(self) -> str:
        """What ``--dry-run`` prints: the exact script text, then the parameters as JSON."""
        return (f"# script: {self.script.name}\n{self.script.text.rstrip()}\n"
                f"# parameters (bound to param(), never pasted into the text):\n"
                f"{json.dumps(dict(self.parameters), ensure_ascii=False, indent=2, sort_keys=True)}")


LIST_VMS = Script("Get-VM", (), r"""
    $result = @(Hyper-V\Get-VM | ForEach-Object { ConvertTo-VmRecord $_ })
""")

GET_CHECKPOINTS = Script("Get-VMSnapshot", ("[string]$VMName",), r"""
    $vm = Resolve-VhdxVM $VMName
    $checkpoints = @(Hyper-V\Get-VMSnapshot -VM $vm | ForEach-Object {
        $snapshot = $_
        $runtimeBytes = $null
        if ($vm.SnapshotFileLocation) {
            $runtimeFile = Join-Path (Join-Path $vm.SnapshotFileLocation 'Snapshots') ([string]$snapshot.Id + '.vmrs')
            if (Test-Path -LiteralPath $runtimeFile) { $runtimeBytes = (Get-Item -LiteralPath $runtimeFile).Length }
        }
        [ordered]@{
            Id = [string]$snapshot.Id
            Name = $snapshot.Name
            SnapshotType = [string]$snapshot.SnapshotType
            CreationTime = $snapshot.CreationTime.ToString('o')
            ParentCheckpointId = (Get-FirstValue $snapshot @('ParentCheckpointId', 'ParentSnapshotId'))
            ParentCheckpointName = (Get-FirstValue $snapshot @('ParentCheckpointName', 'ParentSnapshotName'))
            State = [string]$snapshot.State
            IsAutomaticCheckpoint = [bool]$snapshot.IsAutomaticCheckpoint
            RuntimeStateBytes = $runtimeBytes
            HardDrives = @($snapshot.HardDrives | ForEach-Object { ConvertTo-DriveRecord $_ })
        }
    })
    $result = [ordered]@{ VM = (ConvertTo-VmRecord $vm); Checkpoints = $checkpoints }
""")

GET_VM_DISKS = Script("Get-VMHardDiskDrive", ("[string]$VMName",), r"""
    $vm = Resolve-VhdxVM $VMName
    $disks = @(Hyper-V\Get-VMHardDiskDrive -VM $vm | Where-Object { $_.Path } | ForEach-Object {
        $drive = $_
        $chain = Get-VhdChain $drive.Path
        $base = $chain[$chain.Count - 1].Path
        $folder = Split-Path -Parent $base
        $stem = [System.IO.Path]::GetFileNameWithoutExtension($base) + '_'
        $siblings = @(Get-ChildItem -LiteralPath $folder -File -ErrorAction SilentlyContinue |
            Where-Object { $_.Extension -eq '.avhdx' -and $_.Name.StartsWith($stem, 'OrdinalIgnoreCase') } |
            ForEach-Object { [ordered]@{ Path = $_.FullName; Length = $_.Length } })
        [ordered]@{ Drive = (ConvertTo-DriveRecord $drive); Chain = $chain; FolderAvhdx = $siblings }
    })
    $jobs = @()
    $system = @(Get-CimInstance -Namespace root/virtualization/v2 -ClassName Msvm_ComputerSystem |
        Where-Object { $_.Name -eq [string]$vm.Id })
    if ($system.Count -gt 0) {
        $jobs = @(Get-CimAssociatedInstance -InputObject $system[0] -Association Msvm_AffectedJobElement `
                -ResultClassName CIM_ConcreteJob -ErrorAction SilentlyContinue |
            Where-Object { $_.JobType -in 50, 72 } | ForEach-Object {
                [ordered]@{
                    InstanceID = [string]$_.InstanceID
                    JobType = [int]$_.JobType
                    JobState = [int]$_.JobState
                    PercentComplete = [int]$_.PercentComplete
                    ErrorCode = [int]$_.ErrorCode
                    ErrorDescription = [string]$_.ErrorDescription
                    ErrorSummaryDescription = [string]$_.ErrorSummaryDescription
                    Caption = [string]$_.Caption
                }
            })
    }
    $result = [ordered]@{ VM = (ConvertTo-VmRecord $vm); Disks = $disks; Jobs = $jobs }
""")

GET_VHD = Script("Get-VHD", ("[string]$Path",), r"""
    $result = ConvertTo-VhdRecord (Get-OneVhd $Path)
""")

TEST_VHD = Script("Test-VHD", ("[string]$Path",), r"""
    $testErrors = $null
    $passed = Hyper-V\Test-VHD -Path $Path -ErrorAction SilentlyContinue -ErrorVariable testErrors
    $problems = @($testErrors | ForEach-Object {
        [ordered]@{
            message = [string]$_.Exception.Message
            error_id = [string]$_.FullyQualifiedErrorId
            category = [string]$_.CategoryInfo.Category
            hresult = $_.Exception.HResult
        }
    })
    $result = [ordered]@{ Path = $Path; Passed = [bool]$passed; Problems = $problems }
""")

MERGE_VHD = Script("Merge-VHD", ("[string]$Path", "[string]$DestinationPath"), r"""
    $source = Get-OneVhd $Path
    $destination = $DestinationPath
    if (-not $destination) { $destination = $source.ParentPath }
    if (-not $destination) { Stop-Request 'NotDifferencing' ('not a differencing disk: ' + $Path) }
    $arguments = @{ Path = $Path; DestinationPath = $destination; Confirm = $false }
    Hyper-V\Merge-VHD @arguments
    $result = [ordered]@{
        Source = $Path
        SourceStillExists = (Test-Path -LiteralPath $Path)
        Destination = (ConvertTo-VhdRecord (Get-OneVhd $destination))
    }
""", mutating=True)

SET_VHD_PARENT = Script(
    "Set-VHD", ("[string]$Path", "[string]$ParentPath", "[string]$LeafPath", "[switch]$IgnoreIdMismatch"), r"""
    $arguments = @{ Path = $Path; ParentPath = $ParentPath; Confirm = $false }
    if ($LeafPath) { $arguments['LeafPath'] = $LeafPath }
    if ($IgnoreIdMismatch) { $arguments['IgnoreIdMismatch'] = $true }
    Hyper-V\Set-VHD @arguments
    $result = ConvertTo-VhdRecord (Get-OneVhd $Path)
""", mutating=True)

REMOVE_CHECKPOINT = Script(
    "Remove-VMSnapshot", ("[string]$VMName", "[string]$Name", "[switch]$IncludeAllChildSnapshots"), r"""
    $vm = Resolve-VhdxVM $VMName
    $all = @(Hyper-V\Get-VMSnapshot -VM $vm)
    $matching = @($all | Where-Object { $_.Name -eq $Name })
    if ($matching.Count -eq 0) { Stop-Request 'CheckpointNotFound' ('no checkpoint is named ' + $Name) }
    if ($matching.Count -gt 1) {
        Stop-Request 'CheckpointAmbiguous' ('' + $matching.Count + ' checkpoints are named ' + $Name)
    }
    $checkpoint = $matching[0]
    $subtree = [bool]$IncludeAllChildSnapshots
    Hyper-V\Remove-VMSnapshot -VMSnapshot $checkpoint -IncludeAllChildSnapshots:$subtree -Confirm:$false
    $result = [ordered]@{ Id = [string]$checkpoint.Id; Name = $checkpoint.Name }
""", mutating=True)

ALL_SCRIPTS = (LIST_VMS, GET_CHECKPOINTS, GET_VM_DISKS, GET_VHD, TEST_VHD, MERGE_VHD, SET_VHD_PARENT, REMOVE_CHECKPOINT)

# The local bridge: constant text run with -EncodedCommand. It reads {"script", "parameters"} from stdin and
# splats the parameters onto the script block, so no value ever reaches a command line or the script text.
LOCAL_BRIDGE = r"""
$ErrorActionPreference = 'Stop'
[Console]::InputEncoding = [System.Text.UTF8Encoding]::new($false)
[Console]::OutputEncoding = [System.Text.UTF8Encoding]::new($false)
$request = [Console]::In.ReadToEnd() | ConvertFrom-Json
$block = [scriptblock]::Create([string]$request.script)
$arguments = @{}
if ($request.parameters) {
    foreach ($property in $request.parameters.PSObject.Properties) { $arguments[$property.Name] = $property.Value }
}
& $block @arguments
"""
