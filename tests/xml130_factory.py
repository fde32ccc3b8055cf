"""Synthetic QĐ 130 XML (QĐ 4750/3176 field lists): episodes and GIAMDINHHS envelopes.

Owns: a typical outpatient episode as data (``episode``) and the real envelope built from
episodes (``envelope``: base64 ``NOIDUNGFILE`` per table, several ``HOSO``), with the quirks
real files have. No licence-clean real sample exists (the ones online hold real patients'
data), so the tests and the benchmark use this, written from ``../shared/specs/vn-health-data.md``.
Calls: the standard library only.
Called by: tests/test_xml130_*.py, bench/connectors.py.

An episode is ``{"XML1": {field: text}, "XML2": [row, ...], "XML3": [...], "XML4": [...],
"XML5": [...]}`` plus, when asked, "XML0" (rows), "XML7", "XML8", "XML13", "XML14" (one
record each). Every value is a string (codes keep their leading zeros); "" is an empty element.
"""

from __future__ import annotations

import base64
from collections.abc import Iterable
from typing import Any
from xml.sax.saxutils import escape

from connectors.identifiers import CCCD_PROVINCES

# Each table: (root, list element, row element); None list/row: the root is the record.
ROOTS: dict[str, tuple[str, str | None, str | None]] = {
    "XML0": ("CHI_TIEU_TRANG_THAI_KCB", "DSACH_TRANG_THAI_KCB", "TRANG_THAI_KCB"),
    "XML1": ("TONG_HOP", None, None),
    "XML2": ("CHITIEU_CHITIET_THUOC", "DSACH_CHI_TIET_THUOC", "CHI_TIET_THUOC"),
    "XML3": ("CHITIEU_CHITIET_DVKT_VTYT", "DSACH_CHI_TIET_DVKT", "CHI_TIET_DVKT"),
    "XML4": ("CHITIEU_CHITIET_DICHVUCANLAMSANG", "DSACH_CHI_TIET_CLS", "CHI_TIET_CLS"),
    "XML5": ("CHITIEU_CHITIET_DIENBIENLAMSANG", "DSACH_CHI_TIET_DIEN_BIEN_BENH", "CHI_TIET_DIEN_BIEN_BENH"),
    "XML7": ("CHI_TIEU_DU_LIEU_GIAY_RA_VIEN", None, None),
    "XML8": ("CHI_TIEU_DU_LIEU_TOM_TAT_HO_SO_BENH_AN", None, None),
    # Roots unconfirmed (the spec has none): the reader finds records by their MA_LK child.
    "XML13": ("CHI_TIEU_GIAY_CHUYEN_TUYEN", None, None),
    "XML14": ("CHI_TIEU_GIAY_HEN_KHAM_LAI", None, None),
}


def _names(text: str) -> list[str]:
    return text.split()


ORDER = ("XML0", "XML1", "XML2", "XML3", "XML4", "XML5", "XML7", "XML8", "XML13", "XML14")

XML1_FIELDS = _names(
    "MA_LK STT MA_BN HO_TEN SO_CCCD NGAY_SINH GIOI_TINH NHOM_MAU MA_QUOCTICH MA_DANTOC "
    "MA_NGHE_NGHIEP DIA_CHI MATINH_CU_TRU MAHUYEN_CU_TRU MAXA_CU_TRU DIEN_THOAI MA_THE_BHYT "
    "MA_DKBD GT_THE_TU GT_THE_DEN NGAY_MIEN_CCT LY_DO_VV LY_DO_VNT MA_LY_DO_VNT CHAN_DOAN_VAO "
    "CHAN_DOAN_RV MA_BENH_CHINH MA_BENH_KT MA_BENH_YHCT MA_PTTT_QT MA_DOITUONG_KCB MA_NOI_DI "
    "MA_NOI_DEN MA_TAI_NAN NGAY_VAO NGAY_VAO_NOI_TRU NGAY_RA GIAY_CHUYEN_TUYEN SO_NGAY_DTRI "
    "PP_DIEU_TRI KET_QUA_DTRI MA_LOAI_RV GHI_CHU NGAY_TTOAN T_THUOC T_VTYT T_TONGCHI_BV "
    "T_TONGCHI_BH T_BNTT T_BNCCT T_BHTT T_NGUONKHAC T_BHTT_GDV NAM_QT THANG_QT MA_LOAI_KCB "
    "MA_KHOA MA_CSKCB MA_KHUVUC CAN_NANG CAN_NANG_CON NAM_NAM_LIEN_TUC NGAY_TAI_KHAM MA_HSBA "
    "MA_TTDV DU_PHONG"
)
XML2_FIELDS = _names(
    "MA_LK STT MA_THUOC MA_PP_CHEBIEN MA_CSKCB_THUOC MA_NHOM TEN_THUOC DON_VI_TINH HAM_LUONG "
    "DUONG_DUNG DANG_BAO_CHE LIEU_DUNG CACH_DUNG SO_DANG_KY TT_THAU PHAM_VI TYLE_TT_BH SO_LUONG "
    "DON_GIA THANH_TIEN_BV THANH_TIEN_BH T_NGUONKHAC_NSNN T_NGUONKHAC_VTNN T_NGUONKHAC_VTTN "
    "T_NGUONKHAC_CL T_NGUONKHAC MUC_HUONG T_BNTT T_BNCCT T_BHTT MA_KHOA MA_BAC_SI MA_DICH_VU "
    "NGAY_YL NGAY_TH_YL MA_PTTT NGUON_CTRA VET_THUONG_TP DU_PHONG"
)
XML3_FIELDS = _names(
    "MA_LK STT MA_DICH_VU MA_PTTT_QT MA_VAT_TU MA_NHOM GOI_VTYT TEN_VAT_TU TEN_DICH_VU MA_XANG_DAU "
    "DON_VI_TINH PHAM_VI SO_LUONG DON_GIA_BV DON_GIA_BH TT_THAU TYLE_TT_DV TYLE_TT_BH THANH_TIEN_BV "
    "THANH_TIEN_BH T_TRANTT MUC_HUONG T_NGUONKHAC_NSNN T_NGUONKHAC_VTNN T_NGUONKHAC_VTTN "
    "T_NGUONKHAC_CL T_NGUONKHAC T_BNTT T_BNCCT T_BHTT MA_KHOA MA_GIUONG MA_BAC_SI NGUOI_THUC_HIEN "
    "MA_BENH MA_BENH_YHCT NGAY_YL NGAY_TH_YL NGAY_KQ MA_PTTT VET_THUONG_TP PP_VO_CAM VI_TRI_TH_DVKT "
    "MA_MAY MA_HIEU_SP TAI_SU_DUNG DU_PHONG"
)
XML4_FIELDS = _names(
    "MA_LK STT MA_DICH_VU MA_CHI_SO TEN_CHI_SO GIA_TRI DON_VI_DO MO_TA KET_LUAN NGAY_KQ MA_BS_DOC_KQ DU_PHONG"
)
XML5_FIELDS = _names(
    "MA_LK STT DIEN_BIEN_LS GIAI_DOAN_BENH HOI_CHAN PHAU_THUAT THOI_DIEM_DBLS NGUOI_THUC_HIEN DU_PHONG"
)
XML0_FIELDS = _names(
    "MA_LK STT MA_BN HO_TEN SO_CCCD NGAY_SINH GIOI_TINH MA_THE_BHYT MA_DKBD GT_THE_TU GT_THE_DEN "
    "MA_DOITUONG_KCB NGAY_VAO NGAY_VAO_NOI_TRU LY_DO_VNT MA_LY_DO_VNT MA_LOAI_KCB MA_CSKCB MA_DICH_VU "
    "TEN_DICH_VU MA_THUOC TEN_THUOC MA_VAT_TU TEN_VAT_TU NGAY_YL DU_PHONG"
)

FACILITY = "64001"
DOCTOR = "000123/GL-CCHN"
NURSE = "000456/GL-CCHN"
READER = "000789/GL-CCHN"

_DRUGS = [  # MA_THUOC, TEN_THUOC, HAM_LUONG, DON_VI_TINH, DUONG_DUNG, LIEU_DUNG, SO_LUONG
    ("40.17", "Paracetamol", "500mg", "Viên", "1.01", "1 viên x 3 lần/ngày", "15"),
    ("40.2", "Amoxicilin", "500mg", "Viên", "1.01", "1 viên x 2 lần/ngày", "14"),
    ("40.418", "Amlodipin", "5mg", "Viên", "1.01", "1 viên/ngày, sáng", "30"),
    ("40.563", "Metformin", "850mg", "Viên", "1.01", "1 viên x 2 lần/ngày sau ăn", "60"),
    ("40.677", "Omeprazol", "20mg", "Viên", "1.01", "1 viên/ngày trước ăn sáng", "14"),
    ("40.1003", "Natri clorid 0,9%", "500ml", "Chai", "2.15", "Truyền tĩnh mạch 60 giọt/phút", "1"),
    ("40.82", "Vitamin B1", "100mg", "Ống", "2.10", "1 ống/ngày tiêm bắp", "3"),
]
_LAB = [  # MA_CHI_SO, TEN_CHI_SO, GIA_TRI, DON_VI_DO
    ("GLU", "Glucose", "7.8", "mmol/L"),
    ("URE", "Urê", "5.2", "mmol/L"),
    ("CRE", "Creatinin", "88", "umol/L"),
    ("CHOL", "Cholesterol toàn phần", "5.9", "mmol/L"),
    ("TG", "Triglycerid", "2.1", "mmol/L"),
    ("AST", "AST (GOT)", "32", "U/L"),
    ("ALT", "ALT (GPT)", "41", "U/L"),
    ("HBA1C", "HbA1c", "7.2", "%"),
    ("NTBC", "Hồng cầu niệu", "Âm tính", ""),
]
LAB_SERVICE = "23.0075.1494"  # the chemistry panel (MA_DICH_VU XX.YYYY.ZZZZ)
EXAM_SERVICE = "02.1896"
ECG_SERVICE = "21.0014.1778"
SUPPLY = "N03.04.030"


def _ma_lk(index: int) -> str:
    return f"{FACILITY}{240700000 + index:010d}"


def _cccd(index: int) -> str:
    # 064 (Gia Lai; another registration province per million), 1 (born in the 1900s,
    # female), 85 (1985), serial: distinct for distinct indexes, consistent with the record.
    province = "064" if index < 1_000_000 else _PROVINCES[(index // 1_000_000) % len(_PROVINCES)]
    return f"{province}185{index % 1_000_000:06d}"


_PROVINCES = sorted(CCCD_PROVINCES - {"064"})


def _bhyt(index: int) -> str:
    return f"DN464{6400000000 + index % 100_000_000:010d}"


def episode(index: int = 0, *, drugs: int = 5, lab: int = 6, **overrides: Any) -> dict[str, Any]:
    """A typical closed outpatient episode (MA_LOAI_KCB 01): XML1, ``drugs`` drugs (5–7),
    an exam, an ECG and one supply, a chemistry panel of ``lab`` indicators (5–9), two progress
    notes: about 25–30 resources once mapped. ``index`` makes the episode and its patient
    distinct (MA_LK, MA_BN, CCCD, BHYT). Overrides: a table name ("XML2", "XML7"...) sets
    that table (None drops it); any other upper-case name sets that XML1 field."""
    ma_lk = _ma_lk(index)
    x1: dict[str, str] = dict.fromkeys(XML1_FIELDS, "")
    x1.update(
        MA_LK=ma_lk,
        STT="1",
        MA_BN=f"BN{index:08d}",
        HO_TEN="Nguyễn Thị Hoa",
        SO_CCCD=_cccd(index),
        NGAY_SINH="198503150000",
        GIOI_TINH="2",
        NHOM_MAU="O+",
        MA_QUOCTICH="000",
        MA_DANTOC="01",
        MA_NGHE_NGHIEP="0005",
        DIA_CHI="Tổ 3, phường Diên Hồng, tỉnh Gia Lai",
        MATINH_CU_TRU="52",
        MAHUYEN_CU_TRU="",
        MAXA_CU_TRU="21025",
        DIEN_THOAI="0905123456",
        MA_THE_BHYT=_bhyt(index),
        MA_DKBD="64010",
        GT_THE_TU="20250101",
        GT_THE_DEN="20251231",
        LY_DO_VV="Đau đầu, chóng mặt 3 ngày",
        CHAN_DOAN_VAO="Tăng huyết áp",
        CHAN_DOAN_RV="Tăng huyết áp vô căn; Đái tháo đường type 2",
        MA_BENH_CHINH="I10",
        MA_BENH_KT="E11.9;E78.5",
        MA_PTTT_QT="89.52",
        MA_DOITUONG_KCB="1.1",
        NGAY_VAO="202507010730",
        NGAY_RA="202507011015",
        SO_NGAY_DTRI="1",
        PP_DIEU_TRI="Điều trị nội khoa",
        KET_QUA_DTRI="2",
        MA_LOAI_RV="1",
        NGAY_TTOAN="202507011030",
        T_THUOC="352000",
        T_VTYT="12000",
        T_TONGCHI_BV="612000",
        T_TONGCHI_BH="612000",
        T_BNTT="0",
        T_BNCCT="122400",
        T_BHTT="489600",
        NAM_QT="2025",
        THANG_QT="07",
        MA_LOAI_KCB="01",
        MA_KHOA="K01",
        MA_CSKCB=FACILITY,
        CAN_NANG="58.5",
        NGAY_TAI_KHAM="20250715",
        MA_HSBA=f"HS{index:08d}",
        MA_TTDV="064099000001",
    )
    rows2 = []
    for n, (code, name, strength, unit, route, dose, qty) in enumerate(_DRUGS[: max(1, drugs)], 1):
        row = dict.fromkeys(XML2_FIELDS, "")
        row.update(
            MA_LK=ma_lk,
            STT=str(n),
            MA_THUOC=code,
            MA_NHOM="4",
            TEN_THUOC=name,
            DON_VI_TINH=unit,
            HAM_LUONG=strength,
            DUONG_DUNG=route,
            DANG_BAO_CHE="Viên nén",
            LIEU_DUNG=dose,
            CACH_DUNG="Uống sau ăn" if route == "1.01" else "",
            SO_DANG_KY=f"VD-{30000 + n}-18",
            PHAM_VI="1",
            TYLE_TT_BH="100",
            SO_LUONG=qty,
            DON_GIA="1200.5",
            MUC_HUONG="80",
            MA_KHOA="K01",
            MA_BAC_SI=DOCTOR,
            NGAY_YL="202507010930",
            NGAY_TH_YL="202507011000",
        )
        rows2.append(row)
    services = [
        (EXAM_SERVICE, "13", "Khám Nội", "", "202507010740", "202507010740", "202507010750", DOCTOR),
        (
            LAB_SERVICE,
            "1",
            "Định lượng các chỉ số sinh hóa máu",
            "",
            "202507010800",
            "202507010810",
            "202507010915",
            NURSE,
        ),
        (ECG_SERVICE, "3", "Điện tim thường", "", "202507010800", "202507010820", "202507010830", NURSE),
    ]
    rows3 = []
    for n, (code, group, name, _, yl, th, kq, who) in enumerate(services, 1):
        row = dict.fromkeys(XML3_FIELDS, "")
        row.update(
            MA_LK=ma_lk,
            STT=str(n),
            MA_DICH_VU=code,
            MA_NHOM=group,
            TEN_DICH_VU=name,
            DON_VI_TINH="Lần",
            PHAM_VI="1",
            SO_LUONG="1",
            DON_GIA_BV="50000",
            DON_GIA_BH="50000",
            MA_KHOA="K01",
            MA_BAC_SI=DOCTOR,
            NGUOI_THUC_HIEN=who,
            MA_BENH="I10",
            NGAY_YL=yl,
            NGAY_TH_YL=th,
            NGAY_KQ=kq,
        )
        rows3.append(row)
    supply = dict.fromkeys(XML3_FIELDS, "")
    supply.update(
        MA_LK=ma_lk,
        STT=str(len(rows3) + 1),
        MA_DICH_VU=EXAM_SERVICE,  # used in the exam (the vitamin B1 injection)
        MA_VAT_TU=SUPPLY,
        MA_NHOM="10",
        TEN_VAT_TU="Bơm tiêm nhựa 5ml",
        DON_VI_TINH="Cái",
        PHAM_VI="1",
        SO_LUONG="2",
        MA_KHOA="K01",
        MA_BAC_SI=DOCTOR,
        NGAY_YL="202507010930",
        NGAY_TH_YL="202507010945",
    )
    rows3.append(supply)
    rows4 = []
    for n, (code, name, value, unit) in enumerate(_LAB[: max(1, lab)], 1):
        row = dict.fromkeys(XML4_FIELDS, "")
        row.update(
            MA_LK=ma_lk,
            STT=str(n),
            MA_DICH_VU=LAB_SERVICE,
            MA_CHI_SO=code,
            TEN_CHI_SO=name,
            GIA_TRI=value,
            DON_VI_DO=unit,
            KET_LUAN="Tăng glucose máu" if code == "GLU" else "",
            NGAY_KQ="202507010915",
            MA_BS_DOC_KQ=READER,
        )
        rows4.append(row)
    ecg = dict.fromkeys(XML4_FIELDS, "")
    ecg.update(
        MA_LK=ma_lk,
        STT=str(len(rows4) + 1),
        MA_DICH_VU=ECG_SERVICE,
        MO_TA="Nhịp xoang đều, tần số 78 lần/phút",
        KET_LUAN="Điện tim bình thường",
        NGAY_KQ="202507010830",
        MA_BS_DOC_KQ=READER,
    )
    rows4.append(ecg)
    rows5 = []
    notes = [
        ("Tỉnh, tiếp xúc tốt. HA 160/95 mmHg, mạch 82 l/p. Đau đầu vùng chẩm.", "202507010745"),
        ("HA 140/90 mmHg sau điều trị. Đỡ đau đầu. Cho về, hẹn tái khám.", "202507011010"),
    ]
    for n, (text, when) in enumerate(notes, 1):
        row = dict.fromkeys(XML5_FIELDS, "")
        row.update(MA_LK=ma_lk, STT=str(n), DIEN_BIEN_LS=text, THOI_DIEM_DBLS=when, NGUOI_THUC_HIEN=DOCTOR)
        rows5.append(row)
    result: dict[str, Any] = {"XML1": x1, "XML2": rows2, "XML3": rows3, "XML4": rows4, "XML5": rows5}
    for key, value in overrides.items():
        if key in ROOTS:
            if value is None:
                result.pop(key, None)
            else:
                result[key] = value
        elif key == "MA_LK":  # the episode key: every table's rows carry it
            for table in ("XML2", "XML3", "XML4", "XML5"):
                for row in result.get(table) or []:
                    row["MA_LK"] = value
            x1[key] = value
        else:
            x1[key] = value
    return result


def check_in(ep: dict[str, Any]) -> list[dict[str, str]]:
    """The XML0 check-in row the HIS sends when the episode's first cost arises."""
    x1 = ep["XML1"]
    row = dict.fromkeys(XML0_FIELDS, "")
    for name in XML0_FIELDS:
        if name in x1:
            row[name] = x1[name]
    row.update(STT="1", MA_DICH_VU=EXAM_SERVICE, TEN_DICH_VU="Khám Nội", NGAY_YL=x1["NGAY_VAO"])
    return [row]


def discharge_paper(ep: dict[str, Any]) -> dict[str, str]:
    """XML7, the discharge paper (fields by our best reading of QĐ 4750)."""
    x1 = ep["XML1"]
    return {
        "MA_LK": x1["MA_LK"],
        "SO_LUU_TRU": f"LT{x1['MA_HSBA']}",
        "MA_YTE": x1["MA_BN"],
        "MA_KHOA_RV": x1["MA_KHOA"],
        "NGAY_VAO": x1["NGAY_VAO"],
        "NGAY_RA": x1["NGAY_RA"],
        "CHAN_DOAN_RV": x1["CHAN_DOAN_RV"],
        "PP_DIEUTRI": x1["PP_DIEU_TRI"],
        "GHI_CHU": "Tái khám sau 2 tuần hoặc khi có dấu hiệu bất thường",
        "MA_TTDV": x1["MA_TTDV"],
        "MA_BS": DOCTOR,
        "TEN_BS": "Trần Văn Bình",
        "NGAY_CT": x1["NGAY_RA"][:8],
        "DU_PHONG": "",
    }


def record_summary(ep: dict[str, Any]) -> dict[str, str]:
    """XML8, the medical-record summary (fields by our best reading of QĐ 4750)."""
    x1 = ep["XML1"]
    return {
        "MA_LK": x1["MA_LK"],
        "MA_LOAI_KCB": x1["MA_LOAI_KCB"],
        "NGAY_VAO": x1["NGAY_VAO"],
        "NGAY_RA": x1["NGAY_RA"],
        "CHAN_DOAN_VAO": x1["CHAN_DOAN_VAO"],
        "CHAN_DOAN_RV": x1["CHAN_DOAN_RV"],
        "QT_BENHLY": "Đau đầu vùng chẩm, chóng mặt 3 ngày, không nôn.",
        "TOMTAT_KQ": "Glucose 7.8 mmol/L; điện tim bình thường.",
        "PP_DIEUTRI": x1["PP_DIEU_TRI"],
        "KET_QUA_DTRI": x1["KET_QUA_DTRI"],
        "GHI_CHU": "",
        "MA_TTDV": x1["MA_TTDV"],
        "NGAY_CT": x1["NGAY_RA"][:8],
        "DU_PHONG": "",
    }


def referral(ep: dict[str, Any], to: str = "52001") -> dict[str, str]:
    """XML13, the referral paper (root and fields by our best reading)."""
    x1 = ep["XML1"]
    return {
        "MA_LK": x1["MA_LK"],
        "SO_CHUYENTUYEN": f"CT{x1['MA_HSBA']}",
        "GIAY_CHUYEN_TUYEN": f"{x1['MA_CSKCB']}/2025/123",
        "MA_CSKCB": x1["MA_CSKCB"],
        "MA_NOI_DI": x1["MA_CSKCB"],
        "MA_NOI_DEN": to,
        "DAU_HIEU_LS": "HA 180/110 mmHg không đáp ứng điều trị",
        "CHAN_DOAN_RV": x1["CHAN_DOAN_RV"],
        "QT_BENHLY": "Tăng huyết áp kháng trị",
        "TOMTAT_KQ": "Glucose 7.8 mmol/L",
        "PP_DIEU_TRI": x1["PP_DIEU_TRI"],
        "MA_BENH_CHINH": x1["MA_BENH_CHINH"],
        "MA_BENH_KT": x1["MA_BENH_KT"],
        "MA_LYDO_CT": "1",
        "HUONG_DIEU_TRI": "Chuyển tuyến trên điều trị tiếp",
        "MA_BAC_SI": DOCTOR,
        "NGAY_CT": x1["NGAY_RA"],
        "DU_PHONG": "",
    }


def revisit(ep: dict[str, Any], on: str = "20250715") -> dict[str, str]:
    """XML14, the re-visit appointment paper (root and fields by our best reading)."""
    x1 = ep["XML1"]
    return {
        "MA_LK": x1["MA_LK"],
        "SO_GIAYHEN_KL": f"HK{x1['MA_HSBA']}",
        "MA_CSKCB": x1["MA_CSKCB"],
        "NGAY_VAO": x1["NGAY_VAO"],
        "NGAY_RA": x1["NGAY_RA"],
        "NGAY_HEN_KL": on,
        "CHAN_DOAN_RV": x1["CHAN_DOAN_RV"],
        "MA_BENH_CHINH": x1["MA_BENH_CHINH"],
        "MA_BAC_SI": DOCTOR,
        "NGAY_CT": x1["NGAY_RA"][:8],
        "DU_PHONG": "",
    }


QUIRKS = frozenset({"self-closing", "bad-xsi", "bom", "crlf", "partial-birth", "wrapped-base64", "no-decl"})
_BAD_XSI = ' xmlns:xsi="http://www.w3.org/2001/XMLSchema- instance"'


def _fields(record: dict[str, str], indent: str, nl: str, self_closing: bool) -> str:
    parts = []
    for name, value in record.items():
        if value == "" and self_closing:
            parts.append(f"{indent}<{name}/>")
        else:
            parts.append(f"{indent}<{name}>{escape(value)}</{name}>")
    return nl.join(parts)


def table_document(table: str, content: Any, *, one_line: bool = False, quirks: Iterable[str] = ()) -> bytes:
    """The decoded XML document of one table (what NOIDUNGFILE carries, before base64)."""
    q = frozenset(quirks)
    nl = "" if one_line else ("\r\n" if "crlf" in q else "\n")
    ind = (lambda n: "") if one_line else (lambda n: "  " * n)
    root, listing, item = ROOTS[table]
    xsi = _BAD_XSI if "bad-xsi" in q else ""
    sc = "self-closing" in q
    head = "" if "no-decl" in q else f'<?xml version="1.0" encoding="utf-8"?>{nl}'
    if listing is None:
        body = _fields(content, ind(1), nl, sc)
        text = f"{head}<{root}{xsi}>{nl}{body}{nl}</{root}>"
    else:
        rows = [f"{ind(2)}<{item}>{nl}{_fields(r, ind(3), nl, sc)}{nl}{ind(2)}</{item}>" for r in content]
        inner = nl.join(rows)
        text = f"{head}<{root}{xsi}>{nl}{ind(1)}<{listing}>{nl}{inner}{nl}{ind(1)}</{listing}>{nl}</{root}>"
    return text.encode("utf-8")


def _b64(data: bytes, wrapped: bool) -> str:
    text = base64.b64encode(data).decode("ascii")
    if wrapped:  # MIME style, 76 characters a line, as some exporters write it
        text = "\n".join(text[i : i + 76] for i in range(0, len(text), 76))
    return text


def envelope(
    episodes: list[dict[str, Any]],
    *,
    one_line: bool = False,
    quirks: Iterable[str] = (),
    facility: str = FACILITY,
    ngaylap: str = "20250701",
) -> bytes:
    """The GIAMDINHHS file holding ``episodes`` (one HOSO each). Quirks: "self-closing"
    (empty fields as ``<X/>``), "bad-xsi" (an ``xmlns:xsi`` URI with a space in it, on the
    envelope and every table), "bom", "crlf", "partial-birth" (NGAY_SINH year only:
    ``yyyy00000000``), "wrapped-base64" (NOIDUNGFILE in 76-character lines), "no-decl"."""
    q = frozenset(quirks)
    unknown = q - QUIRKS
    if unknown:
        raise ValueError(f"unknown quirks {sorted(unknown)}")
    nl = "" if one_line else ("\r\n" if "crlf" in q else "\n")
    files = []
    for ep in episodes:
        if "partial-birth" in q and "XML1" in ep:
            ep = {**ep, "XML1": {**ep["XML1"], "NGAY_SINH": ep["XML1"]["NGAY_SINH"][:4] + "00000000"}}
        parts = []
        for table in ORDER:
            if table not in ep:
                continue
            doc = table_document(table, ep[table], one_line=one_line, quirks=q)
            parts.append(
                f"<FILEHOSO><LOAIHOSO>{table}</LOAIHOSO>"
                f"<NOIDUNGFILE>{_b64(doc, 'wrapped-base64' in q)}</NOIDUNGFILE></FILEHOSO>"
            )
        files.append(f"<HOSO>{nl}{nl.join(parts)}{nl}</HOSO>")
    xsi = _BAD_XSI if "bad-xsi" in q else ""
    head = "" if "no-decl" in q else f'<?xml version="1.0" encoding="utf-8"?>{nl}'
    text = (
        f"{head}<GIAMDINHHS{xsi}>{nl}"
        f"<THONGTINDONVI><MACSKCB>{facility}</MACSKCB></THONGTINDONVI>{nl}"
        f"<THONGTINHOSO>{nl}<NGAYLAP>{ngaylap}</NGAYLAP><SOLUONGHOSO>{len(episodes)}</SOLUONGHOSO>{nl}"
        f"<DANHSACHHOSO>{nl}{nl.join(files)}{nl}</DANHSACHHOSO>{nl}</THONGTINHOSO>{nl}"
        f"{'<CHUKYDONVI/>' if 'self-closing' in q else '<CHUKYDONVI></CHUKYDONVI>'}{nl}</GIAMDINHHS>"
    )
    data = text.encode("utf-8")
    return b"\xef\xbb\xbf" + data if "bom" in q else data
